//! The shared-library closure of a host executable, as Nix computes a closure for a
//! store path: the program interpreter (`PT_INTERP`) and every `DT_NEEDED` library,
//! found the way the dynamic loader finds them (`DT_RUNPATH`/`DT_RPATH` with `$ORIGIN`,
//! then the standard directories), recursively. Read from the ELF headers; nothing is
//! executed. 64-bit little-endian ELF only (every architecture sandrun runs on).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

struct Elf<'a> {
    data: &'a [u8],
}

impl Elf<'_> {
    fn u16(&self, off: usize) -> Option<u16> {
        Some(u16::from_le_bytes(
            self.data.get(off..off + 2)?.try_into().ok()?,
        ))
    }
    fn u32(&self, off: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.data.get(off..off + 4)?.try_into().ok()?,
        ))
    }
    fn u64(&self, off: usize) -> Option<u64> {
        Some(u64::from_le_bytes(
            self.data.get(off..off + 8)?.try_into().ok()?,
        ))
    }
    fn cstr(&self, off: usize) -> Option<String> {
        let rest = self.data.get(off..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
}

/// What the dynamic loader reads from one ELF file.
struct Dynamic {
    /// `PT_INTERP`: the loader a program asks for.
    interpreter: Option<String>,
    /// `DT_NEEDED`: the names of the libraries it links.
    needed: Vec<String>,
    /// `DT_RPATH` and `DT_RUNPATH`, split at `:`.
    run_paths: Vec<String>,
}

/// The dynamic section of one ELF file (`data`), as far as the loader needs it.
fn dynamic(data: &[u8]) -> Result<Dynamic, String> {
    if data.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file (`libraries` needs a dynamically linked program)".into());
    }
    if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let e = Elf { data };
    let bad = || "truncated ELF headers".to_string();
    let phoff = e.u64(0x20).ok_or_else(bad)? as usize;
    let phentsize = e.u16(0x36).ok_or_else(bad)? as usize;
    let phnum = e.u16(0x38).ok_or_else(bad)? as usize;
    let mut interp = None;
    let mut dynamic = None;
    let mut loads = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = e.u32(ph).ok_or_else(bad)?;
        let offset = e.u64(ph + 8).ok_or_else(bad)?;
        let vaddr = e.u64(ph + 16).ok_or_else(bad)?;
        let filesz = e.u64(ph + 32).ok_or_else(bad)?;
        match kind {
            PT_INTERP => interp = e.cstr(offset as usize),
            PT_DYNAMIC => dynamic = Some((offset as usize, filesz as usize)),
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            _ => {}
        }
    }
    let Some((dyn_off, dyn_size)) = dynamic else {
        return Ok(Dynamic {
            interpreter: interp,
            needed: Vec::new(),
            run_paths: Vec::new(),
        });
    };
    let mut strtab = None;
    let mut needed = Vec::new();
    let mut paths = Vec::new();
    for i in 0..dyn_size / 16 {
        let tag = e.u64(dyn_off + i * 16).ok_or_else(bad)?;
        let val = e.u64(dyn_off + i * 16 + 8).ok_or_else(bad)?;
        match tag {
            0 => break,
            DT_STRTAB => strtab = Some(val),
            DT_NEEDED => needed.push(val),
            DT_RPATH | DT_RUNPATH => paths.push(val),
            _ => {}
        }
    }
    let strtab = strtab.ok_or("no dynamic string table")?;
    let base = loads
        .iter()
        .find(|(v, _, sz)| strtab >= *v && strtab < v + sz)
        .map(|(v, o, _)| strtab - v + o)
        .ok_or("the dynamic string table is outside every loaded segment")? as usize;
    let s = |off: u64| e.cstr(base + off as usize).ok_or_else(bad);
    Ok(Dynamic {
        interpreter: interp,
        needed: needed.into_iter().map(s).collect::<Result<_, _>>()?,
        run_paths: paths
            .into_iter()
            .map(s)
            .collect::<Result<Vec<String>, _>>()?
            .iter()
            .flat_map(|p| p.split(':').map(str::to_string).collect::<Vec<_>>())
            .collect(),
    })
}

fn standard_dirs() -> Vec<PathBuf> {
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    [
        format!("/lib/{triplet}"),
        format!("/usr/lib/{triplet}"),
        "/lib64".into(),
        "/usr/lib64".into(),
        "/lib".into(),
        "/usr/lib".into(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

/// The host paths of every library `program` (whose bytes are `data`) needs, sorted.
pub fn closure(program: &Path, data: &[u8]) -> Result<Vec<PathBuf>, String> {
    let mut found: BTreeSet<PathBuf> = BTreeSet::new();
    let mut todo: Vec<(PathBuf, Vec<u8>)> = vec![(program.to_path_buf(), data.to_vec())];
    while let Some((path, bytes)) = todo.pop() {
        let Dynamic {
            interpreter: interp,
            needed,
            run_paths: runpaths,
        } = dynamic(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let origin = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let mut dirs: Vec<PathBuf> = runpaths
            .iter()
            .map(|r| {
                PathBuf::from(
                    r.replace("$ORIGIN", &origin.display().to_string())
                        .replace("${ORIGIN}", &origin.display().to_string()),
                )
            })
            .collect();
        dirs.extend(standard_dirs());
        let mut wanted: Vec<PathBuf> = interp.into_iter().map(PathBuf::from).collect();
        for name in needed {
            let hit = if name.contains('/') {
                Some(PathBuf::from(&name))
            } else {
                dirs.iter().map(|d| d.join(&name)).find(|p| p.is_file())
            };
            wanted.push(hit.ok_or_else(|| {
                format!("{}: library {name} not found on this host", path.display())
            })?);
        }
        for lib in wanted {
            if found.insert(lib.clone()) {
                let bytes = std::fs::read(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
                todo.push((lib, bytes));
            }
        }
    }
    Ok(found.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_program_closure() {
        let p = Path::new("/bin/ls");
        let data = std::fs::read(p).unwrap();
        let libs = closure(p, &data).unwrap();
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("libc.so.6")),
            "{libs:?}"
        );
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
        assert!(closure(Path::new("x.sh"), b"#!/bin/sh\n").is_err());
    }
}
