//! Debian's archive metadata as plain data: the `Release` file of a suite (which lists
//! the sha256 of every index) and the `Packages` index of a component (one paragraph
//! per binary package), with the dependency fields parsed into relations.
//!
//! Both are deb822 text: paragraphs separated by blank lines, `Field: value` lines,
//! continuation lines starting with a space.

use std::collections::HashMap;

use super::version::Relation;

/// One `Field: value` paragraph; continuation lines are kept, joined with `\n`.
fn paragraphs(text: &str) -> impl Iterator<Item = Vec<(&str, String)>> + '_ {
    text.split("\n\n").filter_map(|para| {
        let mut fields: Vec<(&str, String)> = Vec::new();
        for line in para.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                if let Some((_, v)) = fields.last_mut() {
                    v.push('\n');
                    v.push_str(line.trim());
                }
            } else if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim(), v.trim().to_string()));
            }
        }
        (!fields.is_empty()).then_some(fields)
    })
}

/// One dependency on a package name, maybe with a version relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dep {
    pub name: String,
    pub relation: Option<(Relation, String)>,
}

impl std::fmt::Display for Dep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.relation {
            Some((r, v)) => write!(f, "{} ({} {v})", self.name, r.as_str()),
            None => f.write_str(&self.name),
        }
    }
}

/// `a (>= 1) | b, c`: a list of alternatives groups.
pub fn parse_deps(field: &str) -> Result<Vec<Vec<Dep>>, String> {
    let mut out = Vec::new();
    for group in field.split(',') {
        let group = group.trim();
        if group.is_empty() {
            continue;
        }
        let mut alts = Vec::new();
        for alt in group.split('|') {
            alts.push(parse_dep(alt.trim())?);
        }
        out.push(alts);
    }
    Ok(out)
}

/// `name[:arch] [(op version)]`; architecture restrictions (`[amd64]`) and build
/// profiles (`<!nocheck>`) occur only in source packages and are not accepted.
pub fn parse_dep(s: &str) -> Result<Dep, String> {
    let (name, rest) = match s.find(|c: char| c == '(' || c.is_whitespace()) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, ""),
    };
    // `python3:any`, `libc6:amd64`: this resolver works for one architecture.
    let name = name.split(':').next().unwrap_or(name);
    if name.is_empty() {
        return Err(format!("`{s}`: no package name"));
    }
    let relation = if rest.is_empty() {
        None
    } else {
        let inner = rest
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("`{s}`: expected `(OP VERSION)` after the name"))?
            .trim();
        let op_len = inner
            .find(|c: char| !matches!(c, '<' | '>' | '='))
            .unwrap_or(inner.len());
        let op = Relation::parse(&inner[..op_len])
            .ok_or_else(|| format!("`{s}`: unknown relation `{}`", &inner[..op_len]))?;
        let version = inner[op_len..].trim();
        if version.is_empty() {
            return Err(format!("`{s}`: no version after `{}`", op.as_str()));
        }
        Some((op, version.to_string()))
    };
    Ok(Dep {
        name: name.to_string(),
        relation,
    })
}

/// A binary package as an index lists it.
#[derive(Clone, Debug, Default)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The source package (`Source:` without its version), else the binary's name.
    pub source: String,
    pub pre_depends: Vec<Vec<Dep>>,
    pub depends: Vec<Vec<Dep>>,
    pub conflicts: Vec<Dep>,
    pub breaks: Vec<Dep>,
    /// `(virtual name, version)` pairs.
    pub provides: Vec<Dep>,
    /// Pool path relative to the archive root.
    pub filename: String,
    pub size: u64,
    pub sha256: String,
    pub essential: bool,
    /// Which configured source it came from (index into the list of archives).
    pub archive: usize,
}

/// Every package of every configured index, looked up by name and by what they provide.
#[derive(Debug, Default)]
pub struct PackageIndex {
    pub packages: Vec<Package>,
    by_name: HashMap<String, Vec<usize>>,
    providers: HashMap<String, Vec<usize>>,
}

impl PackageIndex {
    /// Adds the packages of one `Packages` file (from archive number `archive`), keeping
    /// only those of `arch` and `all`. Broken paragraphs are skipped with a reason.
    pub fn add(&mut self, text: &str, archive: usize, arch: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for fields in paragraphs(text) {
            let get = |k: &str| {
                fields
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.as_str())
            };
            let (Some(name), Some(version), Some(a)) =
                (get("Package"), get("Version"), get("Architecture"))
            else {
                continue;
            };
            if a != arch && a != "all" {
                continue;
            }
            let deps = |k: &str| match get(k) {
                Some(v) => parse_deps(v).map_err(|e| format!("{name} {version}: {k}: {e}")),
                None => Ok(Vec::new()),
            };
            let flat = |k: &str| deps(k).map(|g| g.into_iter().flatten().collect::<Vec<Dep>>());
            let parsed = (|| -> Result<Package, String> {
                Ok(Package {
                    name: name.to_string(),
                    version: version.to_string(),
                    architecture: a.to_string(),
                    source: get("Source")
                        .and_then(|s| s.split_whitespace().next())
                        .unwrap_or(name)
                        .to_string(),
                    pre_depends: deps("Pre-Depends")?,
                    depends: deps("Depends")?,
                    conflicts: flat("Conflicts")?,
                    breaks: flat("Breaks")?,
                    provides: flat("Provides")?,
                    filename: get("Filename")
                        .ok_or_else(|| format!("{name} {version}: no Filename"))?
                        .to_string(),
                    size: get("Size").and_then(|s| s.parse().ok()).unwrap_or(0),
                    sha256: get("SHA256")
                        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                        .ok_or_else(|| format!("{name} {version}: no SHA256"))?
                        .to_ascii_lowercase(),
                    essential: get("Essential") == Some("yes"),
                    archive,
                })
            })();
            match parsed {
                Ok(p) => self.insert(p),
                Err(e) => problems.push(e),
            }
        }
        problems
    }

    fn insert(&mut self, p: Package) {
        let i = self.packages.len();
        self.by_name.entry(p.name.clone()).or_default().push(i);
        for v in &p.provides {
            self.providers.entry(v.name.clone()).or_default().push(i);
        }
        self.packages.push(p);
    }

    /// Every version of `name`, highest first (ties: the first configured source).
    pub fn versions(&self, name: &str) -> Vec<usize> {
        let mut v = self.by_name.get(name).cloned().unwrap_or_default();
        v.sort_by(|&a, &b| {
            super::version::compare(&self.packages[b].version, &self.packages[a].version)
                .then(self.packages[a].archive.cmp(&self.packages[b].archive))
        });
        v
    }

    /// Packages that provide `name`, sorted by name then highest version.
    pub fn providers(&self, name: &str) -> Vec<usize> {
        let mut v = self.providers.get(name).cloned().unwrap_or_default();
        v.sort_by(|&a, &b| {
            let (pa, pb) = (&self.packages[a], &self.packages[b]);
            pa.name
                .cmp(&pb.name)
                .then(super::version::compare(&pb.version, &pa.version))
        });
        v
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// A suite's `Release` file: where its indexes are and what they hash to.
#[derive(Clone, Debug, Default)]
pub struct Release {
    /// `Date:` as seconds since the epoch, when it parses.
    pub date: Option<i64>,
    /// `Acquire-By-Hash: yes`: indexes may be fetched by their hash.
    pub by_hash: bool,
    /// Path (`main/binary-amd64/Packages.xz`) -> (sha256, size).
    pub sha256: HashMap<String, (String, u64)>,
}

impl Release {
    pub fn parse(text: &str) -> Release {
        let mut r = Release::default();
        for fields in paragraphs(text) {
            for (k, v) in fields {
                match k {
                    "Date" => r.date = parse_rfc2822(&v),
                    "Acquire-By-Hash" => r.by_hash = v == "yes",
                    "SHA256" => {
                        for line in v.lines() {
                            let f: Vec<&str> = line.split_whitespace().collect();
                            if let [hash, size, path] = f[..] {
                                if let Ok(size) = size.parse() {
                                    r.sha256
                                        .insert(path.to_string(), (hash.to_ascii_lowercase(), size));
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        r
    }
}

/// `Sat, 10 May 2025 08:52:17 UTC` -> seconds since the epoch.
fn parse_rfc2822(s: &str) -> Option<i64> {
    let f: Vec<&str> = s.split_whitespace().collect();
    let [_, day, mon, year, time, ..] = f[..] else {
        return None;
    };
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = months.iter().position(|&x| x == mon)? as u32 + 1;
    let (d, y): (u32, i64) = (day.parse().ok()?, year.parse().ok()?);
    let t: Vec<i64> = time.split(':').filter_map(|x| x.parse().ok()).collect();
    let [hh, mm, ss] = t[..] else { return None };
    Some(days_from_civil(y, m, d) * 86400 + hh * 3600 + mm * 60 + ss)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Seconds since the epoch -> `2025-05-10T08:52:17Z`.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependency_fields() {
        let d = parse_deps("libc6 (>= 2.34), python3:any | python3-minimal (<< 3.12), foo").unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[0][0].relation, Some((Relation::GreaterEq, "2.34".into())));
        assert_eq!(d[1][0].name, "python3");
        assert_eq!(d[1][1].to_string(), "python3-minimal (<< 3.12)");
        assert!(parse_dep("x (~ 1)").is_err());
        assert!(parse_dep("x (>=)").is_err());
    }

    #[test]
    fn packages_and_release() {
        let text = "Package: a\nVersion: 1.0\nArchitecture: amd64\nDepends: b (>= 2)\nProvides: v (= 1)\nFilename: pool/a.deb\nSize: 10\nSHA256: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\nDescription: x\n more\n\nPackage: a\nVersion: 1.1\nArchitecture: arm64\nFilename: pool/a2.deb\nSHA256: bb\n";
        let mut idx = PackageIndex::default();
        assert!(idx.add(text, 0, "amd64").is_empty());
        assert_eq!(idx.packages.len(), 1);
        let a = &idx.packages[idx.versions("a")[0]];
        assert_eq!(a.sha256, "a".repeat(64));
        assert_eq!(idx.providers("v"), vec![0]);
        let r = Release::parse("Origin: Debian\nDate: Sat, 10 May 2025 08:52:17 UTC\nAcquire-By-Hash: yes\nSHA256:\n 0123 10 main/binary-amd64/Packages.xz\n");
        assert_eq!(r.date, Some(1746867137));
        assert!(r.by_hash);
        assert_eq!(r.sha256["main/binary-amd64/Packages.xz"].1, 10);
        assert_eq!(rfc3339(1746867137), "2025-05-10T08:52:17Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
