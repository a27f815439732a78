//! Reading a `.deb` without dpkg: an `ar` archive holding `debian-binary`,
//! `control.tar.*` and `data.tar.{xz,zst,gz}`. Only the data archive is unpacked (into
//! layer entries); maintainer scripts are never run, a recipe declares what they would
//! have done that the image needs (docs/recipes.md).

use std::io::{self, Read};

use super::layer::{normalise, Entry, Kind};

#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("not a Debian package (no ar header)")]
    NotAr,
    #[error("truncated ar member header")]
    Truncated,
    #[error("no data.tar member")]
    NoData,
    #[error("unsupported data member `{0}`")]
    Compression(String),
    #[error("reading data.tar: {0}")]
    Tar(#[from] io::Error),
}

/// The members of an ar archive: (name, bytes).
fn members(bytes: &[u8]) -> Result<Vec<(String, &[u8])>, DebError> {
    let rest = bytes.strip_prefix(b"!<arch>\n").ok_or(DebError::NotAr)?;
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < rest.len() {
        let h = rest.get(off..off + 60).ok_or(DebError::Truncated)?;
        let name = String::from_utf8_lossy(&h[..16]).trim().trim_end_matches('/').to_string();
        let size: usize = String::from_utf8_lossy(&h[48..58])
            .trim()
            .parse()
            .map_err(|_| DebError::Truncated)?;
        let start = off + 60;
        let data = rest.get(start..start + size).ok_or(DebError::Truncated)?;
        out.push((name, data));
        off = start + size + (size & 1);
    }
    Ok(out)
}

/// What one package contributes to the image.
pub struct Contents {
    pub entries: Vec<Entry>,
    /// `/usr/share/doc/PACKAGE/copyright`, for the SBOM's licence.
    pub copyright: Option<String>,
}

/// Unpacks the data archive of the `.deb` in `bytes`. With `clamp`, mtimes later than it
/// are lowered to it (SOURCE_DATE_EPOCH).
pub fn contents(bytes: &[u8], package: &str, clamp: Option<u64>) -> Result<Contents, DebError> {
    let (name, data) = members(bytes)?
        .into_iter()
        .find(|(n, _)| n.starts_with("data.tar"))
        .ok_or(DebError::NoData)?;
    let reader: Box<dyn Read + '_> = match name.as_str() {
        "data.tar" => Box::new(data),
        "data.tar.xz" => Box::new(lzma_rust2::XzReader::new(data, true)),
        "data.tar.zst" => Box::new(zstd::stream::read::Decoder::new(data)?),
        "data.tar.gz" => Box::new(flate2::read::MultiGzDecoder::new(data)),
        other => return Err(DebError::Compression(other.to_string())),
    };
    let copyright_path = format!("usr/share/doc/{package}/copyright");
    let mut copyright = None;
    let mut entries = Vec::new();
    let mut ar = tar::Archive::new(reader);
    for e in ar.entries()? {
        let mut e = e?;
        let raw = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let Some(path) = normalise(&raw) else { continue };
        let h = e.header();
        let mode = h.mode()? & 0o7777;
        let (uid, gid) = (h.uid()? as u32, h.gid()? as u32);
        let mut mtime = h.mtime()?;
        if let Some(c) = clamp {
            mtime = mtime.min(c);
        }
        let link = || -> io::Result<String> {
            Ok(e.link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned())
                .unwrap_or_default())
        };
        let kind = match h.entry_type() {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink(link()?),
            tar::EntryType::Link => match normalise(&link()?) {
                Some(t) => Kind::Hardlink(t),
                None => continue,
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut buf = Vec::with_capacity(h.size()? as usize);
                e.read_to_end(&mut buf)?;
                if path == copyright_path {
                    copyright = Some(String::from_utf8_lossy(&buf).into_owned());
                }
                Kind::File(buf)
            }
            // Debian packages ship no devices or fifos in data.tar; skip anything else.
            _ => continue,
        };
        entries.push(Entry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
        });
    }
    Ok(Contents { entries, copyright })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A .deb made here: ar with a gzip data.tar holding one file and one symlink.
    fn deb() -> Vec<u8> {
        let mut tarball = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(3);
        h.set_mtime(2_000_000_000);
        tarball.append_data(&mut h, "./usr/bin/x", &b"abc"[..]).unwrap();
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_mtime(7);
        l.set_uid(0);
        l.set_gid(0);
        l.set_mode(0o777);
        l.set_size(0);
        tarball.append_link(&mut l, "./bin/y", "../usr/bin/x").unwrap();
        let data = tarball.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &data).unwrap();
        let data = gz.finish().unwrap();
        let mut out = b"!<arch>\n".to_vec();
        for (name, body) in [("debian-binary", &b"2.0\n"[..]), ("data.tar.gz", &data[..])] {
            out.extend(format!("{name:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n", 0, 0, 0, 100644, body.len()).as_bytes());
            out.extend(body);
            if body.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        out
    }

    #[test]
    fn unpacks_data_tar() {
        let c = contents(&deb(), "x", Some(1_000)).unwrap();
        assert_eq!(c.entries.len(), 2);
        assert_eq!(c.entries[0].path, "usr/bin/x");
        assert_eq!(c.entries[0].kind, Kind::File(b"abc".to_vec()));
        assert_eq!(c.entries[0].mtime, 1_000);
        assert_eq!(c.entries[1].kind, Kind::Symlink("../usr/bin/x".into()));
        assert_eq!(c.entries[1].mtime, 7);
        assert!(matches!(contents(b"junk", "x", None), Err(DebError::NotAr)));
    }
}
