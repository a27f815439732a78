//! Debian version numbers and the relations between them (`>=`, `<<`, ...), compared as
//! dpkg compares them (Debian Policy 5.6.12): the epoch numerically, then the upstream
//! version and the revision by alternating runs of non-digits (where `~` sorts before
//! everything, even the end of the string, and letters before other characters) and
//! digits (compared as numbers).

use std::cmp::Ordering;

/// Compares two Debian version strings.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| compare_part(ua, ub))
        .then_with(|| compare_part(ra, rb))
}

fn split(v: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, r)) if !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) => {
            (e.parse().unwrap_or(0), r)
        }
        _ => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((u, r)) => (epoch, u, r),
        None => (epoch, rest, ""),
    }
}

fn order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_alphabetic() => c as i32,
        Some(c) => c as i32 + 256,
    }
}

fn compare_part(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    while !a.is_empty() || !b.is_empty() {
        // Non-digit runs, character by character.
        loop {
            let ca = a.first().copied().filter(|c| !c.is_ascii_digit());
            let cb = b.first().copied().filter(|c| !c.is_ascii_digit());
            if ca.is_none() && cb.is_none() {
                break;
            }
            let (oa, ob) = (order(ca), order(cb));
            if oa != ob {
                return oa.cmp(&ob);
            }
            a = &a[1..];
            b = &b[1..];
        }
        // Digit runs, as numbers (leading zeros do not count).
        let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
        let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
        let na = trim_zeros(&a[..da]);
        let nb = trim_zeros(&b[..db]);
        let by_number = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
        if by_number != Ordering::Equal {
            return by_number;
        }
        a = &a[da..];
        b = &b[db..];
    }
    Ordering::Equal
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n..]
}

/// A version relation of a dependency: `(>= 1.2)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// `<<`
    Less,
    /// `<=` (and the obsolete `<`)
    LessEq,
    /// `=`
    Eq,
    /// `>=` (and the obsolete `>`)
    GreaterEq,
    /// `>>`
    Greater,
}

impl Relation {
    pub fn parse(op: &str) -> Option<Relation> {
        Some(match op {
            "<<" => Relation::Less,
            "<=" | "<" => Relation::LessEq,
            "=" => Relation::Eq,
            ">=" | ">" => Relation::GreaterEq,
            ">>" => Relation::Greater,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Relation::Less => "<<",
            Relation::LessEq => "<=",
            Relation::Eq => "=",
            Relation::GreaterEq => ">=",
            Relation::Greater => ">>",
        }
    }

    /// Whether `version` stands in this relation to `to`.
    pub fn holds(self, version: &str, to: &str) -> bool {
        let o = compare(version, to);
        match self {
            Relation::Less => o == Ordering::Less,
            Relation::LessEq => o != Ordering::Greater,
            Relation::Eq => o == Ordering::Equal,
            Relation::GreaterEq => o != Ordering::Less,
            Relation::Greater => o == Ordering::Greater,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_ordering() {
        let lt = |a: &str, b: &str| {
            assert_eq!(compare(a, b), Ordering::Less, "{a} < {b}");
            assert_eq!(compare(b, a), Ordering::Greater, "{b} > {a}");
        };
        lt("1.0", "1.1");
        lt("1.0~rc1", "1.0");
        lt("1.0", "1.0a");
        lt("1.0a", "1.0+");
        lt("1.9", "1.10");
        lt("1:0.1", "2:0.0");
        lt("2.0", "1:0.1");
        lt("1.0-1", "1.0-2");
        lt("1.0-9", "1.0-10");
        lt("1.2.3-1~deb12u1", "1.2.3-1");
        lt("15.8-0+deb12u1", "15.10-0+deb12u1");
        assert_eq!(compare("1.01", "1.1"), Ordering::Equal);
        assert_eq!(compare("0:1.0", "1.0"), Ordering::Equal);
    }

    #[test]
    fn relations() {
        assert!(Relation::parse(">=").unwrap().holds("2.36-9", "2.34"));
        assert!(!Relation::parse("<<").unwrap().holds("2.36", "2.36"));
        assert!(Relation::parse("=").unwrap().holds("1:1.35.0-4", "1:1.35.0-4"));
        assert!(Relation::parse(">>").unwrap().holds("1.1", "1.0"));
        assert!(Relation::parse("!").is_none());
    }
}
