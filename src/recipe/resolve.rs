//! The dependency closure of a recipe's packages, as plain data.
//!
//! Rules (written down in docs/recipes.md): `Pre-Depends` and `Depends` are followed;
//! `Recommends` and `Suggests` are not. In a group of alternatives (`a | b`) one already
//! chosen wins, else the first real package that satisfies it, else the first
//! virtual one that some package provides. A name no package has is a
//! virtual package: a chosen package providing it wins, else the provider that sorts
//! first. Of several versions the highest that satisfies the relation is taken.
//! `Essential: yes` packages are not added implicitly: a recipe lists what it needs.
//! A package needed at two incompatible versions, and `Conflicts`/`Breaks` between
//! chosen packages, are errors naming the chain of packages that led there.

use std::collections::{BTreeMap, VecDeque};

use super::index::{Dep, PackageIndex};

/// Why a closure cannot be formed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// A requested name that no package has or provides (index of the request).
    Unknown { request: usize, suggestion: Option<String> },
    /// Nothing satisfies `dep`, needed along `chain` (request first).
    Unsatisfiable {
        request: usize,
        chain: Vec<String>,
        dep: String,
        reason: String,
    },
    /// Two chosen packages cannot be installed together.
    Conflict {
        request: usize,
        chain: Vec<String>,
        reason: String,
    },
}

/// The chosen packages (indices into the index), sorted by name.
pub fn closure(index: &PackageIndex, requests: &[Dep]) -> Result<Vec<usize>, ResolveError> {
    // Chosen package name -> (package, request number, parent name).
    let mut chosen: BTreeMap<String, (usize, usize, Option<String>)> = BTreeMap::new();
    let mut queue: VecDeque<usize> = VecDeque::new();
    let chain = |chosen: &BTreeMap<String, (usize, usize, Option<String>)>, from: &str| {
        let mut c = vec![from.to_string()];
        let mut cur = chosen.get(from).and_then(|e| e.2.clone());
        while let Some(p) = cur {
            if c.contains(&p) {
                break;
            }
            cur = chosen.get(&p).and_then(|e| e.2.clone());
            c.push(p);
        }
        c.reverse();
        c
    };
    for (ri, dep) in requests.iter().enumerate() {
        if index.versions(&dep.name).is_empty() && index.providers(&dep.name).is_empty() {
            let suggestion = index
                .names()
                .map(|n| (strsim::jaro_winkler(n, &dep.name), n))
                .filter(|(s, _)| *s > 0.85)
                .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(a.1)))
                .map(|(_, n)| n.to_string());
            return Err(ResolveError::Unknown {
                request: ri,
                suggestion,
            });
        }
        match pick(index, &chosen, std::slice::from_ref(dep)) {
            Pick::Satisfied => {}
            Pick::Choose(p) => {
                let name = index.packages[p].name.clone();
                if let Some((other, _, _)) = chosen.get(&name) {
                    let o = &index.packages[*other];
                    return Err(ResolveError::Conflict {
                        request: ri,
                        chain: vec![name.clone()],
                        reason: format!("{dep} is wanted, but {} {} was chosen already", o.name, o.version),
                    });
                }
                chosen.insert(name, (p, ri, None));
                queue.push_back(p);
            }
            Pick::None(reason) => {
                return Err(ResolveError::Unsatisfiable {
                    request: ri,
                    chain: vec![],
                    dep: dep.to_string(),
                    reason,
                })
            }
        }
    }
    while let Some(p) = queue.pop_front() {
        let pkg = &index.packages[p];
        let request = chosen[&pkg.name].1;
        for group in pkg.pre_depends.iter().chain(&pkg.depends) {
            match pick(index, &chosen, group) {
                Pick::Satisfied => {}
                Pick::Choose(q) => {
                    let name = index.packages[q].name.clone();
                    if let Some((other, _, _)) = chosen.get(&name) {
                        let o = &index.packages[*other];
                        return Err(ResolveError::Conflict {
                            request,
                            chain: chain(&chosen, &pkg.name),
                            reason: format!(
                                "{} needs {}, but {} {} was chosen already",
                                pkg.name,
                                alternatives(group),
                                o.name,
                                o.version
                            ),
                        });
                    }
                    chosen.insert(name, (q, request, Some(pkg.name.clone())));
                    queue.push_back(q);
                }
                Pick::None(reason) => {
                    return Err(ResolveError::Unsatisfiable {
                        request,
                        chain: chain(&chosen, &pkg.name),
                        dep: alternatives(group),
                        reason,
                    })
                }
            }
        }
    }
    // Conflicts and Breaks among the chosen.
    for (name, (p, request, _)) in &chosen {
        let pkg = &index.packages[*p];
        for c in pkg.conflicts.iter().chain(&pkg.breaks) {
            for (other, (q, other_request, _)) in &chosen {
                let o = &index.packages[*q];
                if other == name {
                    continue;
                }
                let hit = (o.name == c.name && version_ok(&o.version, c))
                    || (c.relation.is_none() && o.provides.iter().any(|v| v.name == c.name));
                if hit {
                    // Blame the later of the two requests: it brought the conflict in.
                    return Err(ResolveError::Conflict {
                        request: (*request).max(*other_request),
                        chain: chain(&chosen, name),
                        reason: format!(
                            "{} {} conflicts with {c}, and {} {} was chosen",
                            pkg.name, pkg.version, o.name, o.version
                        ),
                    });
                }
            }
        }
    }
    Ok(chosen.into_values().map(|(p, _, _)| p).collect())
}

fn alternatives(group: &[Dep]) -> String {
    group
        .iter()
        .map(Dep::to_string)
        .collect::<Vec<_>>()
        .join(" | ")
}

fn version_ok(version: &str, dep: &Dep) -> bool {
    dep.relation
        .as_ref()
        .is_none_or(|(r, v)| r.holds(version, v))
}

enum Pick {
    Satisfied,
    Choose(usize),
    None(String),
}

/// How the alternatives `group` are met given what is chosen.
fn pick(
    index: &PackageIndex,
    chosen: &BTreeMap<String, (usize, usize, Option<String>)>,
    group: &[Dep],
) -> Pick {
    let provides_ok = |p: usize, dep: &Dep| {
        index.packages[p].provides.iter().any(|v| {
            v.name == dep.name
                && match (&dep.relation, &v.relation) {
                    (None, _) => true,
                    (Some((r, want)), Some((_, have))) => r.holds(have, want),
                    (Some(_), None) => false,
                }
        })
    };
    // Already met by something chosen?
    for dep in group {
        if let Some((p, _, _)) = chosen.get(&dep.name) {
            if version_ok(&index.packages[*p].version, dep) {
                return Pick::Satisfied;
            }
        }
        if chosen.values().any(|(p, _, _)| provides_ok(*p, dep)) {
            return Pick::Satisfied;
        }
    }
    // Real packages first: `awk | mawk` means "mawk unless something provides awk".
    for dep in group {
        if let Some(&p) = index
            .versions(&dep.name)
            .iter()
            .find(|&&p| version_ok(&index.packages[p].version, dep))
        {
            return Pick::Choose(p);
        }
    }
    let mut reasons = Vec::new();
    for dep in group {
        let versions = index.versions(&dep.name);
        if let Some(&p) = index.providers(&dep.name).iter().find(|&&p| provides_ok(p, dep)) {
            return Pick::Choose(p);
        }
        reasons.push(if versions.is_empty() {
            format!("no package is or provides {}", dep.name)
        } else {
            format!(
                "{} has only {}",
                dep.name,
                versions
                    .iter()
                    .map(|&p| index.packages[p].version.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
    }
    Pick::None(reasons.join("; "))
}

#[cfg(test)]
mod tests {
    use super::super::index::parse_dep;
    use super::*;

    fn index() -> PackageIndex {
        let mut text = String::new();
        let mut add = |name: &str, version: &str, extra: &str| {
            text.push_str(&format!(
                "Package: {name}\nVersion: {version}\nArchitecture: amd64\n{extra}Filename: pool/{name}_{version}.deb\nSHA256: {}\n\n",
                "0".repeat(64)
            ));
        };
        add("app", "1.0", "Depends: libc6 (>= 2.30), awk | mawk\n");
        add("libc6", "2.36-9", "");
        add("libc6", "2.28-1", "");
        add("mawk", "1.3", "Provides: awk\n");
        add("gawk", "5.2", "Provides: awk\n");
        add("old", "1.0", "Depends: libc6 (<< 2.29)\n");
        add("bad", "1.0", "Depends: missing (>= 1)\n");
        add("x", "1.0", "Conflicts: y\n");
        add("y", "1.0", "");
        add("cyc", "1.0", "Depends: cyc2\n");
        add("cyc2", "1.0", "Pre-Depends: cyc\n");
        let mut idx = PackageIndex::default();
        assert!(idx.add(&text, 0, "amd64").is_empty());
        idx
    }

    fn names(idx: &PackageIndex, r: &[usize]) -> Vec<String> {
        r.iter()
            .map(|&p| format!("{}={}", idx.packages[p].name, idx.packages[p].version))
            .collect()
    }

    fn req(s: &[&str]) -> Vec<Dep> {
        s.iter().map(|d| parse_dep(d).unwrap()).collect()
    }

    #[test]
    fn closure_follows_depends_alternatives_and_virtuals() {
        let idx = index();
        let r = closure(&idx, &req(&["app"])).unwrap();
        assert_eq!(names(&idx, &r), ["app=1.0", "libc6=2.36-9", "mawk=1.3"]);
        // A chosen provider satisfies a later virtual dependency.
        let r = closure(&idx, &req(&["gawk", "app"])).unwrap();
        assert_eq!(names(&idx, &r), ["app=1.0", "gawk=5.2", "libc6=2.36-9"]);
        // Cycles between packages are fine.
        let r = closure(&idx, &req(&["cyc"])).unwrap();
        assert_eq!(r.len(), 2);
        // A pinned version is honoured.
        let r = closure(&idx, &req(&["libc6 (= 2.28-1)", "old"])).unwrap();
        assert_eq!(names(&idx, &r), ["libc6=2.28-1", "old=1.0"]);
    }

    #[test]
    fn bad_closures_name_the_chain() {
        let idx = index();
        match closure(&idx, &req(&["app", "nosuch"])) {
            Err(ResolveError::Unknown { request: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
        match closure(&idx, &req(&["libc6c"])) {
            Err(ResolveError::Unknown { suggestion, .. }) => {
                assert_eq!(suggestion.as_deref(), Some("libc6"))
            }
            other => panic!("{other:?}"),
        }
        match closure(&idx, &req(&["bad"])) {
            Err(ResolveError::Unsatisfiable { chain, dep, .. }) => {
                assert_eq!(chain, ["bad"]);
                assert_eq!(dep, "missing (>= 1)");
            }
            other => panic!("{other:?}"),
        }
        match closure(&idx, &req(&["app", "old"])) {
            Err(ResolveError::Conflict { request: 1, reason, .. }) => {
                assert!(reason.contains("libc6 2.36-9"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            closure(&idx, &req(&["libc6 (>= 3)"])),
            Err(ResolveError::Unsatisfiable { .. })
        ));
        assert!(matches!(
            closure(&idx, &req(&["x", "y"])),
            Err(ResolveError::Conflict { .. })
        ));
    }
}
