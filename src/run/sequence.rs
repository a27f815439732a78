//! Build numbers (`<+pipeline.sequenceId>`, `HARNESS_BUILD_ID`): Harness numbers every
//! execution of a pipeline 1, 2, 3…, and scripts tag artifacts with that number, so a
//! local run must get a number that grows too. The last number taken for a pipeline is
//! kept in sandrun's home, `sequence/<pipeline>`; `run` takes the next one under an
//! exclusive lock on that file (concurrent runs get distinct numbers), while `plan` and
//! `validate` only read which number the next run would get.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error("cannot keep the build number in {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} does not hold a build number ({text:?}): remove it to start again at 1", path.display())]
    Corrupt { path: PathBuf, text: String },
}

/// The file that keeps `pipeline`'s last build number under `home`. Characters other
/// than letters, digits, `_`, `-` and `.` (a stage file's name may hold any) become `_`.
pub fn file_for(home: &Path, pipeline: &str) -> PathBuf {
    let name: String = pipeline
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = if name.is_empty() || name.starts_with('.') {
        format!("_{name}")
    } else {
        name
    };
    home.join("sequence").join(name)
}

/// The number the next run of the pipeline kept in `path` will get, taking nothing.
pub fn peek(path: &Path) -> Result<u64, SequenceError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse(path, &text)? + 1),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(1),
        Err(source) => Err(SequenceError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Takes the next number of the pipeline kept in `path`: the file is locked
/// exclusively while it is read and rewritten, so no two runs get the same number.
pub fn take(path: &Path) -> Result<u64, SequenceError> {
    let io_err = |source| SequenceError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err)?;
    let mut file: Flock<File> = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_err(io::Error::from(errno)))?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io_err)?;
    let next = if text.trim().is_empty() {
        1
    } else {
        parse(path, &text)? + 1
    };
    file.rewind().map_err(io_err)?;
    file.set_len(0).map_err(io_err)?;
    file.write_all(format!("{next}\n").as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(io_err)?;
    Ok(next)
}

fn parse(path: &Path, text: &str) -> Result<u64, SequenceError> {
    text.trim().parse().map_err(|_| SequenceError::Corrupt {
        path: path.to_path_buf(),
        text: text.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_grow_and_peeking_takes_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_for(dir.path(), "my pipe/line");
        assert_eq!(path, dir.path().join("sequence/my_pipe_line"));
        assert_eq!(peek(&path).unwrap(), 1);
        assert_eq!(take(&path).unwrap(), 1);
        assert_eq!(peek(&path).unwrap(), 2);
        assert_eq!(peek(&path).unwrap(), 2);
        assert_eq!(take(&path).unwrap(), 2);
        assert_eq!(take(&path).unwrap(), 3);
    }

    #[test]
    fn concurrent_runs_get_distinct_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_for(dir.path(), "p");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    (0..10).map(|_| take(&path).unwrap()).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (1..=80).collect::<Vec<_>>());
    }

    #[test]
    fn a_damaged_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_for(dir.path(), "p");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "seven").unwrap();
        let e = take(&path).unwrap_err().to_string();
        assert!(e.contains("sequence/p") && e.contains("seven"), "{e}");
    }
}
