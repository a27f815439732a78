//! The recipe file (`images/NAME.yaml`) parsed into plain data. Every field keeps its
//! position, so that errors found later (an unknown package, a missing host file) still
//! name `file:line:col`. The format is documented in docs/recipes.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::{Loc, RecipeError};
use crate::pipeline::yaml::{self, Node, Value};

/// Where the image starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Base {
    /// An empty root file system.
    None,
    /// Another recipe (a path relative to this recipe's directory).
    Recipe(PathBuf),
    /// An image pinned by digest (`debian@sha256:...`).
    Image(String),
}

/// A Debian archive: `deb URI SUITE... COMPONENT...` with its signing keyring.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Source {
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    /// The OpenPGP keyring the suite's `InRelease` must be signed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
}

/// What a `files:` entry puts into the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// Inline content.
    Content(String),
    /// A host file (absolute, or relative to the recipe); with `libraries`, the shared
    /// libraries it loads come along at their host paths.
    Host { from: PathBuf, libraries: bool },
    Directory,
    Symlink(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub loc: Loc,
    /// Absolute path in the image, normalised (`/usr/local/bin/x`).
    pub path: String,
    pub kind: FileKind,
    pub mode: Option<u32>,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The image configuration (OCI `config`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageSettings {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// `5432/tcp`.
    pub ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: Option<String>,
}

/// A package request: `name` or `name (= version)`, where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackageRequest {
    pub loc: Loc,
    pub dep: super::index::Dep,
}

#[derive(Clone, Debug)]
pub struct Recipe {
    /// The recipe file, as given.
    pub path: PathBuf,
    pub name: String,
    pub tag: String,
    pub base: Base,
    pub base_loc: Loc,
    /// Debian architecture (`amd64`).
    pub architecture: String,
    /// `None`: the host's configured sources.
    pub sources: Option<Vec<Source>>,
    pub packages: Vec<PackageRequest>,
    pub files: Vec<FileEntry>,
    pub users: Vec<User>,
    pub groups: Vec<Group>,
    pub config: ImageSettings,
    /// The recipe's bytes (part of the build's cache key).
    pub text: String,
}

impl Recipe {
    /// The image's name in the store: `localhost/NAME:TAG` (like podman's local builds).
    pub fn reference(&self) -> String {
        format!("localhost/{}:{}", self.name, self.tag)
    }

    /// The directory relative paths are resolved against.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    pub fn loc_of_start(&self) -> Loc {
        Loc {
            file: self.path.clone(),
            line: 1,
            col: 1,
        }
    }
}

/// Debian's name for this machine's architecture.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "arm" => "armhf",
        "powerpc64" => "ppc64el",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

struct P<'a> {
    file: &'a Path,
}

impl P<'_> {
    fn loc(&self, n: &Node) -> Loc {
        Loc {
            file: self.file.to_path_buf(),
            line: n.pos.line,
            col: n.pos.col,
        }
    }

    fn err(&self, n: &Node, message: impl Into<String>) -> RecipeError {
        RecipeError::Invalid {
            loc: self.loc(n),
            message: message.into(),
        }
    }

    fn map<'n>(
        &self,
        n: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Result<Vec<(&'n str, &'n Node, &'n Node)>, RecipeError> {
        let Value::Map(entries) = &n.value else {
            return Err(self.err(n, format!("{what} must be a mapping, not {}", n.kind_name())));
        };
        let mut out = Vec::new();
        for (k, v) in entries {
            let key = k.as_str().unwrap_or_default();
            if !allowed.contains(&key) {
                let hint = allowed
                    .iter()
                    .map(|a| (strsim::jaro_winkler(a, key), *a))
                    .filter(|(s, _)| *s > 0.8)
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, a)| format!(" (did you mean `{a}`?)"))
                    .unwrap_or_default();
                return Err(self.err(
                    k,
                    format!(
                        "unknown field `{key}` in {what}{hint}; expected one of: {}",
                        allowed.join(", ")
                    ),
                ));
            }
            out.push((key, k, v));
        }
        Ok(out)
    }

    fn string(&self, n: &Node, field: &str) -> Result<String, RecipeError> {
        match &n.value {
            Value::Scalar { text, .. } => Ok(text.clone()),
            _ => Err(self.err(n, format!("`{field}` must be a string, not {}", n.kind_name()))),
        }
    }

    fn seq<'n>(&self, n: &'n Node, field: &str) -> Result<&'n [Node], RecipeError> {
        match &n.value {
            Value::Seq(items) => Ok(items),
            Value::Null => Ok(&[]),
            _ => Err(self.err(n, format!("`{field}` must be a list, not {}", n.kind_name()))),
        }
    }

    fn strings(&self, n: &Node, field: &str) -> Result<Vec<String>, RecipeError> {
        match &n.value {
            Value::Scalar { text, .. } => Ok(vec![text.clone()]),
            _ => self
                .seq(n, field)?
                .iter()
                .map(|i| self.string(i, field))
                .collect(),
        }
    }

    fn string_map(&self, n: &Node, field: &str) -> Result<BTreeMap<String, String>, RecipeError> {
        let Value::Map(entries) = &n.value else {
            if n.is_null() {
                return Ok(BTreeMap::new());
            }
            return Err(self.err(n, format!("`{field}` must be a mapping, not {}", n.kind_name())));
        };
        let mut out = BTreeMap::new();
        for (k, v) in entries {
            let value = match &v.value {
                Value::Null => String::new(),
                _ => self.string(v, field)?,
            };
            out.insert(k.as_str().unwrap_or_default().to_string(), value);
        }
        Ok(out)
    }

    fn number(&self, n: &Node, field: &str) -> Result<u32, RecipeError> {
        let s = self.string(n, field)?;
        s.parse()
            .map_err(|_| self.err(n, format!("`{field}` must be a whole number, not `{s}`")))
    }

    fn mode(&self, n: &Node) -> Result<u32, RecipeError> {
        let s = self.string(n, "mode")?;
        let digits = s.strip_prefix("0o").unwrap_or(&s);
        match u32::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o7777 => Ok(m),
            _ => Err(self.err(n, format!("`mode` must be octal permissions such as 0755, not `{s}`"))),
        }
    }

    fn owner(&self, n: &Node) -> Result<(u32, u32), RecipeError> {
        let s = self.string(n, "owner")?;
        let parse = |x: &str| x.parse::<u32>().ok();
        match s.split_once(':') {
            Some((u, g)) => match (parse(u), parse(g)) {
                (Some(u), Some(g)) => Ok((u, g)),
                _ => Err(self.err(n, format!("`owner` must be numeric UID:GID, not `{s}`"))),
            },
            None => match parse(&s) {
                Some(u) => Ok((u, u)),
                None => Err(self.err(n, format!("`owner` must be numeric UID:GID, not `{s}`"))),
            },
        }
    }

    fn image_path(&self, n: &Node, field: &str) -> Result<String, RecipeError> {
        let s = self.string(n, field)?;
        if !s.starts_with('/') {
            return Err(self.err(n, format!("`{field}` must be an absolute path in the image, not `{s}`")));
        }
        let mut parts: Vec<&str> = Vec::new();
        for c in s.split('/') {
            match c {
                "" | "." => {}
                ".." => return Err(self.err(n, format!("`{field}`: `..` is not allowed (`{s}`)"))),
                c => parts.push(c),
            }
        }
        if parts.is_empty() {
            return Err(self.err(n, format!("`{field}` cannot be the root directory")));
        }
        Ok(format!("/{}", parts.join("/")))
    }
}

/// Parses the recipe at `path`.
pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|e| RecipeError::read(path, e))?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Recipe, RecipeError> {
    let p = P { file: path };
    let root = yaml::parse(text).map_err(|e| RecipeError::Invalid {
        loc: Loc {
            file: path.to_path_buf(),
            line: e.pos.line,
            col: e.pos.col,
        },
        message: e.message,
    })?;
    let top = p.map(
        &root,
        "the recipe",
        &[
            "name", "tag", "base", "architecture", "sources", "packages", "files", "users",
            "groups", "config",
        ],
    )?;
    let start = Loc {
        file: path.to_path_buf(),
        line: 1,
        col: 1,
    };
    let mut r = Recipe {
        path: path.to_path_buf(),
        name: String::new(),
        tag: "latest".into(),
        base: Base::None,
        base_loc: start.clone(),
        architecture: host_architecture().to_string(),
        sources: None,
        packages: Vec::new(),
        files: Vec::new(),
        users: Vec::new(),
        groups: Vec::new(),
        config: ImageSettings::default(),
        text: text.to_string(),
    };
    for (key, _, v) in top {
        match key {
            "name" => {
                let name = p.string(v, "name")?;
                let ok = !name.is_empty()
                    && name.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)
                    })
                    && !name.starts_with(['.', '-', '/']);
                if !ok {
                    return Err(p.err(v, format!("`name` must be lowercase letters, digits, `.`, `_`, `-` or `/`, not `{name}`")));
                }
                r.name = name;
            }
            "tag" => {
                let tag = p.string(v, "tag")?;
                let ok = !tag.is_empty()
                    && tag.len() <= 128
                    && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                    && !tag.starts_with(['.', '-']);
                if !ok {
                    return Err(p.err(v, format!("`tag` is not a valid image tag: `{tag}`")));
                }
                r.tag = tag;
            }
            "base" => {
                r.base_loc = p.loc(v);
                let s = p.string(v, "base")?;
                r.base = if s == "none" || s.is_empty() {
                    Base::None
                } else if s.ends_with(".yaml") || s.ends_with(".yml") {
                    Base::Recipe(PathBuf::from(s))
                } else if s.contains("@sha256:") {
                    crate::store::ImageRef::parse(&s).map_err(|e| p.err(v, e.to_string()))?;
                    Base::Image(s)
                } else {
                    return Err(p.err(v, format!("`base` must be `none`, a recipe (`./other.yaml`) or an image pinned by digest (`NAME@sha256:...`), not `{s}`")));
                };
            }
            "architecture" => r.architecture = p.string(v, "architecture")?,
            "sources" => {
                let mut sources = Vec::new();
                for s in p.seq(v, "sources")? {
                    let mut src = Source {
                        uri: String::new(),
                        suites: Vec::new(),
                        components: vec!["main".into()],
                        keyring: None,
                    };
                    for (k, kn, sv) in p.map(s, "a source", &["uri", "suites", "components", "keyring"])? {
                        match k {
                            "uri" => src.uri = p.string(sv, "uri")?.trim_end_matches('/').to_string(),
                            "suites" => src.suites = p.strings(sv, "suites")?,
                            "components" => src.components = p.strings(sv, "components")?,
                            _ => src.keyring = Some(PathBuf::from(p.string(sv, "keyring")?)),
                        }
                        let _ = kn;
                    }
                    if !(src.uri.starts_with("http://") || src.uri.starts_with("https://")) {
                        return Err(p.err(s, "a source needs `uri: http://...` (or https)"));
                    }
                    if src.suites.is_empty() {
                        return Err(p.err(s, "a source needs at least one suite (`suites: [bookworm]`)"));
                    }
                    sources.push(src);
                }
                r.sources = Some(sources);
            }
            "packages" => {
                for item in p.seq(v, "packages")? {
                    let s = p.string(item, "packages")?;
                    // `name=version` is accepted as a shorthand for `name (= version)`.
                    let spelled = match s.split_once('=') {
                        Some((n, ver)) if !n.contains('(') => format!("{} (= {})", n.trim(), ver.trim()),
                        _ => s.clone(),
                    };
                    let dep = super::index::parse_dep(&spelled).map_err(|e| p.err(item, e))?;
                    if r.packages.iter().any(|q| q.dep.name == dep.name) {
                        return Err(p.err(item, format!("package `{}` is listed twice", dep.name)));
                    }
                    r.packages.push(PackageRequest { loc: p.loc(item), dep });
                }
            }
            "files" => {
                for item in p.seq(v, "files")? {
                    r.files.push(file_entry(&p, item)?);
                }
            }
            "users" => {
                for item in p.seq(v, "users")? {
                    let mut u = User {
                        name: String::new(),
                        uid: u32::MAX,
                        gid: u32::MAX,
                        home: "/nonexistent".into(),
                        shell: "/usr/sbin/nologin".into(),
                    };
                    for (k, _, uv) in p.map(item, "a user", &["name", "uid", "gid", "home", "shell"])? {
                        match k {
                            "name" => u.name = p.string(uv, "name")?,
                            "uid" => u.uid = p.number(uv, "uid")?,
                            "gid" => u.gid = p.number(uv, "gid")?,
                            "home" => u.home = p.string(uv, "home")?,
                            _ => u.shell = p.string(uv, "shell")?,
                        }
                    }
                    if u.name.is_empty() || u.uid == u32::MAX {
                        return Err(p.err(item, "a user needs `name` and `uid`"));
                    }
                    if u.gid == u32::MAX {
                        u.gid = u.uid;
                    }
                    r.users.push(u);
                }
            }
            "groups" => {
                for item in p.seq(v, "groups")? {
                    let mut g = Group {
                        name: String::new(),
                        gid: u32::MAX,
                        members: Vec::new(),
                    };
                    for (k, _, gv) in p.map(item, "a group", &["name", "gid", "members"])? {
                        match k {
                            "name" => g.name = p.string(gv, "name")?,
                            "gid" => g.gid = p.number(gv, "gid")?,
                            _ => g.members = p.strings(gv, "members")?,
                        }
                    }
                    if g.name.is_empty() || g.gid == u32::MAX {
                        return Err(p.err(item, "a group needs `name` and `gid`"));
                    }
                    r.groups.push(g);
                }
            }
            _ => r.config = settings(&p, v)?,
        }
    }
    if r.name.is_empty() {
        return Err(RecipeError::Invalid {
            loc: start,
            message: "the recipe needs a `name`".into(),
        });
    }
    Ok(r)
}

fn file_entry(p: &P<'_>, item: &Node) -> Result<FileEntry, RecipeError> {
    let mut path = None;
    let mut kind = None;
    let mut mode = None;
    let mut owner = (0, 0);
    let mut libraries = None;
    let mut set_kind = |k: FileKind, n: &Node| {
        if kind.is_some() {
            return Err(p.err(n, "a file takes exactly one of `content`, `from`, `directory` and `symlink`"));
        }
        kind = Some(k);
        Ok(())
    };
    for (k, kn, v) in p.map(
        item,
        "a file",
        &["path", "content", "from", "libraries", "directory", "symlink", "mode", "owner"],
    )? {
        match k {
            "path" => path = Some(p.image_path(v, "path")?),
            "content" => set_kind(FileKind::Content(p.string(v, "content")?), kn)?,
            "from" => set_kind(
                FileKind::Host {
                    from: PathBuf::from(p.string(v, "from")?),
                    libraries: false,
                },
                kn,
            )?,
            "libraries" => libraries = Some((p.string(v, "libraries")? == "true", kn)),
            "directory" => {
                if p.string(v, "directory")? != "true" {
                    return Err(p.err(v, "`directory` takes `true`"));
                }
                set_kind(FileKind::Directory, kn)?
            }
            "symlink" => set_kind(FileKind::Symlink(p.string(v, "symlink")?), kn)?,
            "mode" => mode = Some(p.mode(v)?),
            _ => owner = p.owner(v)?,
        }
    }
    let path = path.ok_or_else(|| p.err(item, "a file needs a `path`"))?;
    let mut kind = kind.ok_or_else(|| {
        p.err(item, "a file needs one of `content`, `from`, `directory` and `symlink`")
    })?;
    if let Some((wanted, at)) = libraries {
        match &mut kind {
            FileKind::Host { libraries, .. } => *libraries = wanted,
            _ => return Err(p.err(at, "`libraries` goes with `from` (a host file)")),
        }
    }
    Ok(FileEntry {
        loc: p.loc(item),
        path,
        kind,
        mode,
        uid: owner.0,
        gid: owner.1,
    })
}

fn settings(p: &P<'_>, n: &Node) -> Result<ImageSettings, RecipeError> {
    let mut s = ImageSettings::default();
    for (k, _, v) in p.map(
        n,
        "`config`",
        &["entrypoint", "cmd", "env", "workdir", "user", "ports", "labels", "stopSignal"],
    )? {
        match k {
            "entrypoint" => s.entrypoint = Some(p.strings(v, "entrypoint")?),
            "cmd" => s.cmd = Some(p.strings(v, "cmd")?),
            "env" => s.env = p.string_map(v, "env")?,
            "workdir" => s.workdir = Some(p.image_path(v, "workdir")?),
            "user" => s.user = Some(p.string(v, "user")?),
            "ports" => {
                for port in p.seq(v, "ports")? {
                    let text = p.string(port, "ports")?;
                    let (num, proto) = text.split_once('/').unwrap_or((&text, "tcp"));
                    match (num.parse::<u16>(), proto) {
                        (Ok(n), "tcp" | "udp" | "sctp") if n > 0 => {
                            s.ports.push(format!("{n}/{proto}"))
                        }
                        _ => {
                            return Err(p.err(port, format!("`ports`: expected PORT or PORT/tcp|udp, not `{text}`")))
                        }
                    }
                }
            }
            "labels" => s.labels = p.string_map(v, "labels")?,
            _ => s.stop_signal = Some(p.string(v, "stopSignal")?),
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        parse(Path::new("images/x.yaml"), text).unwrap_err().to_string()
    }

    #[test]
    fn full_recipe() {
        let r = parse(
            Path::new("images/pg.yaml"),
            "name: pg\ntag: '15'\nbase: none\npackages:\n  - busybox-static\n  - libc6=2.36-9\nfiles:\n  - path: /etc/motd\n    content: hi\n    mode: 0600\n  - path: /var/lib/pg\n    directory: true\n    owner: 999:999\n  - path: //bin/sh\n    symlink: busybox\nusers:\n  - {name: postgres, uid: 999}\ngroups:\n  - {name: postgres, gid: 999}\nconfig:\n  entrypoint: [/bin/sh]\n  env: {A: b}\n  ports: [5432, 53/udp]\n",
        )
        .unwrap();
        assert_eq!(r.reference(), "localhost/pg:15");
        assert_eq!(r.packages[1].dep.to_string(), "libc6 (= 2.36-9)");
        assert_eq!(r.packages[1].loc.line, 6);
        assert_eq!(r.files[0].mode, Some(0o600));
        assert_eq!((r.files[1].uid, r.files[1].gid), (999, 999));
        assert_eq!(r.files[2].path, "/bin/sh");
        assert_eq!(r.users[0].gid, 999);
        assert_eq!(r.config.ports, ["5432/tcp", "53/udp"]);
    }

    #[test]
    fn malformed_recipes_name_the_line() {
        assert!(parse_err("name: x\npackges: [a]\n").starts_with("images/x.yaml:2:1: unknown field `packges`"));
        assert!(parse_err("name: x\nfiles:\n  - path: etc/x\n    content: y\n").contains(":3:11: `path` must be an absolute path"));
        assert!(parse_err("name: x\nfiles:\n  - path: /x\n    content: y\n    symlink: z\n").contains(":5:5:"));
        assert!(parse_err("name: x\nfiles:\n  - path: /x\n    content: y\n    mode: 999\n").contains("octal"));
        assert!(parse_err("packages: [a]\n").contains("needs a `name`"));
        assert!(parse_err("name: x\nbase: debian:12\n").contains(":2:7: `base` must be"));
        assert!(parse_err("name: x\npackages: [a, a]\n").contains("listed twice"));
        assert!(parse_err("name: x\nconfig:\n  ports: [http]\n").contains(":3:11:"));
        assert!(parse_err("name: x\n  bad: [\n").starts_with("images/x.yaml:"));
    }
}
