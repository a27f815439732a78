//! Reproducible layers: a list of entries in, the same tar+gzip bytes out on any machine.
//!
//! Entries are sorted by path (a hardlink always follows the file it links to), carry
//! numeric owners only (no user or group names, so the build machine's
//! `/etc/passwd` never leaks in; owners are written, never applied, so no root is
//! needed), fixed timestamps, no extended attributes, and the gzip stream has no name
//! and no time in its header. Parent directories a recipe does not declare are added
//! (0755, root) so that every layer is complete on its own.

use std::collections::BTreeMap;
use std::io::{self, Write};

use sha2::{Digest as _, Sha256};

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    /// A hardlink to another path of the same layer.
    Hardlink(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative, normalised: `usr/bin/env` (no leading `/` or `./`, no trailing `/`).
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
}

/// A finished layer: the compressed blob and its identities.
pub struct Layer {
    pub blob: Vec<u8>,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
}

/// `./usr/bin/` -> `usr/bin`; `None` for the root itself or for `..` components.
pub fn normalise(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Sorts `entries` (a later entry for the same path replaces an earlier one), adds
/// missing parent directories with `mtime`, and makes hardlinks point forward only.
pub fn canonical(entries: Vec<Entry>, mtime: u64) -> Vec<Entry> {
    let mut by_path: BTreeMap<String, Entry> = BTreeMap::new();
    for e in entries {
        by_path.insert(e.path.clone(), e);
    }
    let parents: Vec<String> = by_path
        .keys()
        .flat_map(|p| {
            let mut v = Vec::new();
            let mut cur = p.as_str();
            while let Some((parent, _)) = cur.rsplit_once('/') {
                v.push(parent.to_string());
                cur = parent;
            }
            v
        })
        .collect();
    for p in parents {
        by_path.entry(p.clone()).or_insert(Entry {
            path: p,
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime,
        });
    }
    // Hardlink sets: the first path of each set in sorted order holds the data.
    let mut sets: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (p, e) in &by_path {
        if let Kind::Hardlink(t) = &e.kind {
            sets.entry(t.clone()).or_default().push(p.clone());
        }
    }
    for (target, links) in sets {
        let Some(data) = by_path.get(&target).cloned() else {
            // A link to nothing in this layer: dropped (the unpacker would refuse it).
            for l in links {
                by_path.remove(&l);
            }
            continue;
        };
        if matches!(data.kind, Kind::Hardlink(_) | Kind::Dir) {
            for l in links {
                by_path.remove(&l);
            }
            continue;
        }
        let first = links.iter().chain(std::iter::once(&target)).min().cloned().expect("set");
        for p in links.iter().chain(std::iter::once(&target)) {
            let e = by_path.get_mut(p).expect("in map");
            if *p == first {
                e.kind = data.kind.clone();
                e.mode = data.mode;
                e.uid = data.uid;
                e.gid = data.gid;
                e.mtime = data.mtime;
            } else {
                e.kind = Kind::Hardlink(first.clone());
            }
        }
    }
    by_path.into_values().collect()
}

struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `entries` (already [`canonical`]) as a gzip-compressed tar.
pub fn write(entries: &[Entry]) -> io::Result<Layer> {
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(HashWriter {
        inner: gz,
        hasher: Sha256::new(),
    });
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(e.uid as u64);
        h.set_gid(e.gid as u64);
        h.set_mtime(e.mtime);
        match &e.kind {
            Kind::File(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, &e.path, data.as_slice())?;
            }
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, format!("{}/", e.path), io::empty())?;
            }
            Kind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                tar.append_link(&mut h, &e.path, target)?;
            }
            Kind::Hardlink(target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                tar.append_link(&mut h, &e.path, target)?;
            }
        }
    }
    let hw = tar.into_inner()?;
    let diff_id = format!("sha256:{}", hex::encode(hw.hasher.finalize()));
    let blob = hw.inner.finish()?;
    Ok(Layer { blob, diff_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str, data: &str) -> Entry {
        Entry {
            path: p.into(),
            kind: Kind::File(data.as_bytes().to_vec()),
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 5,
        }
    }

    #[test]
    fn same_entries_same_bytes_in_any_order() {
        let a = vec![file("usr/bin/b", "x"), file("etc/a", "y")];
        let b = vec![file("etc/a", "y"), file("usr/bin/b", "x")];
        let la = write(&canonical(a, 1)).unwrap();
        let lb = write(&canonical(b, 1)).unwrap();
        assert_eq!(la.blob, lb.blob);
        assert_eq!(la.diff_id, lb.diff_id);
        let paths: Vec<String> = canonical(vec![file("usr/bin/b", "x")], 1)
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(paths, ["usr", "usr/bin", "usr/bin/b"]);
        assert_eq!(normalise("./usr/bin/"), Some("usr/bin".into()));
        assert_eq!(normalise("./"), None);
        assert_eq!(normalise("a/../b"), None);
    }

    #[test]
    fn hardlinks_point_forward() {
        let mut link = file("a/link", "");
        link.kind = Kind::Hardlink("z/data".into());
        let out = canonical(vec![file("z/data", "D"), link], 1);
        let a = out.iter().find(|e| e.path == "a/link").unwrap();
        let z = out.iter().find(|e| e.path == "z/data").unwrap();
        assert_eq!(a.kind, Kind::File(b"D".to_vec()));
        assert_eq!(z.kind, Kind::Hardlink("a/link".into()));
        // And the result unpacks: the tar crate reads it back.
        let layer = write(&out).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&layer.blob[..]));
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a/", "a/link", "z/", "z/data"]);
    }
}
