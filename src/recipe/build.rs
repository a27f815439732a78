//! From recipe and lock to an image in the store.
//!
//! Layers, lowest first: the base image's (if any), the packages' (one per package for
//! up to 16 packages, so images that share a package share its layer and a rebuild
//! after one package changed rebuilds one layer; past that the 15 largest packages
//! have a layer each and the rest share one), and one for what the recipe itself adds
//! (`/etc/passwd`, `/etc/group`, files, directories, symlinks). A package layer is
//! made once per set of `.deb` hashes and remembered in `$SANDRUN_HOME/debian/layers/`;
//! an image is remembered by the digest of everything it is made from (recipe, lock,
//! host files, base, SOURCE_DATE_EPOCH) in `$SANDRUN_HOME/recipes/`, so an unchanged
//! recipe is not rebuilt at all.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use super::archive::{host_sources, Archives};
use super::deb;
use super::error::RecipeError;
use super::layer::{self, Entry, Kind};
use super::lockfile::{lock_path, LockedPackage, RecipeLock, RECIPE_LOCK_VERSION};
use super::model::{self, Base, FileKind, Recipe};
use super::resolve::{self, ResolveError};
use super::sbom;
use crate::store::{Image, PullOptions, PullPolicy, PullProgress, Store};

/// Bumped whenever the bytes a layer is written as change, so that cached package
/// layers of an older sandrun are not reused.
const LAYER_FORMAT: &str = "sandrun-layer-1";
const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Manifest annotation naming the SBOM blob.
pub const SBOM_ANNOTATION: &str = "dev.sandrun.sbom";
/// Manifest annotation naming the recipe digest the image was built from.
pub const RECIPE_ANNOTATION: &str = "dev.sandrun.recipe";

/// How to build.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Never open a network connection: `.deb` files and indexes must be in the store.
    pub offline: bool,
    /// Refuse a missing or stale lock instead of writing it.
    pub locked: bool,
    /// For base images and their registries.
    pub pull: PullOptions,
}

/// A built (or found) image.
#[derive(Clone, Debug)]
pub struct Built {
    pub image: Image,
    /// The recipe digest (the cache key).
    pub key: String,
    /// Found in the store: nothing was built.
    pub cached: bool,
    /// What the user should know (a lock written, a Release not verified).
    pub notes: Vec<String>,
}

/// Builds the recipe at `path` (and the recipes it is based on, lowest first) into
/// `store`.
pub async fn build(
    store: &Store,
    path: &Path,
    opts: &BuildOptions,
    progress: &dyn PullProgress,
) -> Result<Built, RecipeError> {
    let chain = load_chain(path)?;
    let mut notes = Vec::new();
    let mut base: Option<Image> = None;
    let mut last = None;
    for recipe in chain.into_iter().rev() {
        if let Base::Image(reference) = &recipe.base {
            base = Some(
                store
                    .ensure(reference, PullPolicy::IfNotPresent, &opts.pull, progress)
                    .await
                    .map_err(|e| RecipeError::Invalid {
                        loc: recipe.base_loc.clone(),
                        message: format!("base image: {e}"),
                    })?,
            );
        }
        let (store2, opts2, base2) = (store.clone(), opts.clone(), base.take());
        let prepared =
            tokio::task::spawn_blocking(move || prepare(&store2, recipe, base2.as_ref(), &opts2))
                .await
                .expect("build task panicked")?;
        notes.extend(prepared.notes);
        let built = match prepared.outcome {
            Outcome::Cached(image) => Built {
                image: *image,
                key: prepared.key,
                cached: true,
                notes: Vec::new(),
            },
            Outcome::Manifest { reference, bytes } => {
                let digest = crate::store::layout::sha256_digest(&bytes);
                let image = store.add_built(&reference, bytes, progress).await?;
                remember(store, &prepared.key, &digest)?;
                Built {
                    image,
                    key: prepared.key,
                    cached: false,
                    notes: Vec::new(),
                }
            }
        };
        base = Some(built.image.clone());
        last = Some(built);
    }
    let mut built = last.expect("a chain has at least one recipe");
    built.notes = notes;
    Ok(built)
}

/// The recipe at `path` and the recipes it is based on, top first; a cycle is an error
/// at the `base:` that closes it.
fn load_chain(path: &Path) -> Result<Vec<Recipe>, RecipeError> {
    let mut chain: Vec<(std::path::PathBuf, Recipe)> = Vec::new();
    let mut next = path.to_path_buf();
    loop {
        let recipe = model::load(&next)?;
        let canon = next
            .canonicalize()
            .map_err(|e| RecipeError::read(&next, e))?;
        if let Some(i) = chain.iter().position(|(p, _)| *p == canon) {
            let mut names: Vec<String> = chain[i..]
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            names.push(canon.display().to_string());
            let (_, closing) = chain.last().expect("a recipe before");
            return Err(RecipeError::Cycle {
                loc: closing.base_loc.clone(),
                chain: names,
            });
        }
        let base = match &recipe.base {
            Base::Recipe(rel) => {
                let p: std::path::PathBuf = recipe.dir().join(rel).components().collect();
                if !p.is_file() {
                    return Err(RecipeError::Invalid {
                        loc: recipe.base_loc.clone(),
                        message: format!("base recipe {} does not exist", p.display()),
                    });
                }
                Some(p)
            }
            _ => None,
        };
        chain.push((canon, recipe));
        match base {
            Some(p) => next = p,
            None => break,
        }
    }
    Ok(chain.into_iter().map(|(_, r)| r).collect())
}

enum Outcome {
    // Boxed: an image record is several times the size of the other variant.
    Cached(Box<Image>),
    Manifest { reference: String, bytes: Vec<u8> },
}

struct Prepared {
    key: String,
    outcome: Outcome,
    notes: Vec<String>,
}

fn remembered(store: &Store, key: &str) -> Option<String> {
    std::fs::read_to_string(store.root().join("recipes").join(key)).ok()
}

fn remember(store: &Store, key: &str, digest: &str) -> Result<(), RecipeError> {
    let dir = store.root().join("recipes");
    std::fs::create_dir_all(&dir).map_err(|e| RecipeError::read(&dir, e))?;
    store
        .layout()
        .write_atomic(&dir.join(key), digest.as_bytes())
        .map_err(RecipeError::from)
}

/// The lock of `recipe`: read and checked against it, else (unless `locked`) resolved
/// and written.
fn ensure_lock(
    recipe: &Recipe,
    archives: &Archives,
    locked: bool,
    notes: &mut Vec<String>,
) -> Result<RecipeLock, RecipeError> {
    let path = lock_path(&recipe.path);
    if path.is_file() {
        let lock = RecipeLock::read(&path)?;
        match stale(recipe, &lock) {
            None => return Ok(lock),
            Some(why) if locked => {
                return Err(RecipeError::Lock {
                    path,
                    reason: format!("{why}; run `sandrun lock {}`", recipe.path.display()),
                })
            }
            Some(why) => notes.push(format!("{}: {why}; updating it", path.display())),
        }
    } else if locked {
        return Err(RecipeError::Lock {
            path: path.clone(),
            reason: format!(
                "does not exist (--locked); run `sandrun lock {}`",
                recipe.path.display()
            ),
        });
    }
    let lock = resolve_lock(recipe, archives)?;
    lock.write(&path)?;
    notes.push(format!(
        "wrote {} ({} packages)",
        path.display(),
        lock.packages.len()
    ));
    Ok(lock)
}

/// Why `lock` no longer fits `recipe`, if it does not.
fn stale(recipe: &Recipe, lock: &RecipeLock) -> Option<String> {
    if lock.architecture != recipe.architecture {
        return Some(format!(
            "it is for {}, the recipe for {}",
            lock.architecture, recipe.architecture
        ));
    }
    if lock.requested != requested(recipe) {
        return Some("the recipe's packages changed since it was written".into());
    }
    None
}

fn requested(recipe: &Recipe) -> Vec<String> {
    let mut v: Vec<String> = recipe.packages.iter().map(|p| p.dep.to_string()).collect();
    v.sort();
    v
}

/// Resolves the recipe's packages against its sources' indexes into a fresh lock.
pub fn resolve_lock(recipe: &Recipe, archives: &Archives) -> Result<RecipeLock, RecipeError> {
    let sources = recipe.sources.clone().unwrap_or_else(host_sources);
    if sources.is_empty() && !recipe.packages.is_empty() {
        return Err(RecipeError::Invalid {
            loc: recipe.packages[0].loc.clone(),
            message: "the recipe names no `sources` and this host has no Debian sources configured (/etc/apt/sources.list.d)".into(),
        });
    }
    let (packages, newest) = if recipe.packages.is_empty() {
        (Vec::new(), None)
    } else {
        let (index, newest) = archives.load_index(&sources, &recipe.architecture)?;
        let requests: Vec<_> = recipe.packages.iter().map(|p| p.dep.clone()).collect();
        let chosen = resolve::closure(&index, &requests).map_err(|e| match e {
            ResolveError::Unknown {
                request,
                suggestion,
            } => RecipeError::UnknownPackage {
                loc: recipe.packages[request].loc.clone(),
                name: recipe.packages[request].dep.name.clone(),
                suggestion,
            },
            ResolveError::Unsatisfiable {
                request,
                chain,
                dep,
                reason,
            } => RecipeError::Unsatisfiable {
                loc: recipe.packages[request].loc.clone(),
                chain,
                dep,
                reason,
            },
            ResolveError::Conflict {
                request,
                chain,
                reason,
            } => RecipeError::Conflict {
                loc: recipe.packages[request].loc.clone(),
                chain,
                reason,
            },
        })?;
        let mut locked: Vec<LockedPackage> = Vec::new();
        let mut uris: Vec<&str> = Vec::new();
        for s in &sources {
            for _suite in &s.suites {
                for _c in &s.components {
                    uris.push(&s.uri);
                }
            }
        }
        for p in chosen {
            let pkg = &index.packages[p];
            locked.push(LockedPackage {
                name: pkg.name.clone(),
                version: pkg.version.clone(),
                architecture: pkg.architecture.clone(),
                sha256: pkg.sha256.clone(),
                size: pkg.size,
                url: format!(
                    "{}/{}",
                    uris.get(pkg.archive).copied().unwrap_or_default(),
                    pkg.filename
                ),
                source: pkg.source.clone(),
            });
        }
        locked.sort_by(|a, b| a.name.cmp(&b.name));
        (locked, newest)
    };
    Ok(RecipeLock {
        version: RECIPE_LOCK_VERSION,
        architecture: recipe.architecture.clone(),
        source_date_epoch: newest.unwrap_or(0),
        requested: requested(recipe),
        packages,
    })
}

/// A package layer as remembered in `debian/layers/`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct PackageLayer {
    blob: String,
    size: u64,
    diff_id: String,
    /// Licence expression per package of the layer (for the SBOM).
    licenses: BTreeMap<String, Option<String>>,
}

/// At most this many layers come from packages: overlayfs takes its lower directories
/// in one page of mount options, so a 100-package closure cannot be 100 layers.
const MAX_PACKAGE_LAYERS: usize = 16;

/// How the lock's packages are split into layers: one per package when they are few;
/// else the largest `.deb`s get a layer each (they are what images most gain from
/// sharing: libc6, libllvm, perl, python) and the rest share one. Deterministic: a
/// function of the lock alone.
fn layer_groups(lock: &RecipeLock) -> Vec<Vec<&LockedPackage>> {
    let all: Vec<&LockedPackage> = lock.packages.iter().collect();
    if all.len() <= MAX_PACKAGE_LAYERS {
        return all.into_iter().map(|p| vec![p]).collect();
    }
    let mut by_size = all.clone();
    by_size.sort_by(|a, b| b.size.cmp(&a.size).then(a.name.cmp(&b.name)));
    let big: std::collections::BTreeSet<&str> = by_size[..MAX_PACKAGE_LAYERS - 1]
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let mut groups: Vec<Vec<&LockedPackage>> = vec![all
        .iter()
        .filter(|p| !big.contains(p.name.as_str()))
        .copied()
        .collect()];
    groups.extend(
        all.iter()
            .filter(|p| big.contains(p.name.as_str()))
            .map(|p| vec![*p]),
    );
    groups
}

fn source_date_epoch() -> Option<u64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

fn prepare(
    store: &Store,
    recipe: Recipe,
    base: Option<&Image>,
    opts: &BuildOptions,
) -> Result<Prepared, RecipeError> {
    let archives = Archives::new(store, opts.offline)?;
    let mut notes = Vec::new();
    let host_files = read_host_files(&recipe)?;
    let lock = ensure_lock(&recipe, &archives, opts.locked, &mut notes)?;
    let clamp = source_date_epoch();
    let epoch = clamp.unwrap_or(lock.source_date_epoch.max(0) as u64);

    let key = cache_key(&recipe, &lock, base, &host_files, clamp);
    let reference = recipe.reference();
    if let Some(image) = cached(store, &reference, &key)? {
        notes.extend(archives.take_notes());
        return Ok(Prepared {
            key,
            outcome: Outcome::Cached(Box::new(image)),
            notes,
        });
    }

    // Package layers, built by as many workers as there are CPUs.
    let layers = package_layers(store, &archives, &lock, clamp)?;
    notes.extend(archives.take_notes());

    // The recipe's own layer.
    let own = own_entries(&recipe, host_files, epoch);
    let own = layer::write(&layer::canonical(own, epoch)).map_err(|e| RecipeError::BadContent {
        what: recipe.path.display().to_string(),
        reason: format!("writing the recipe's layer: {e}"),
    })?;
    let own_blob = store.put_blob(&own.blob)?;

    // Base layers first.
    let mut descs: Vec<Value> = Vec::new();
    let mut diff_ids: Vec<String> = Vec::new();
    let mut config_base = Map::new();
    if let Some(b) = base {
        let m = store.manifest(&b.manifest_digest)?;
        for d in m.layers() {
            descs.push(json!({"mediaType": d.media_type().to_string(), "digest": d.digest().to_string(), "size": d.size()}));
        }
        diff_ids.extend(b.config.rootfs().diff_ids().iter().cloned());
        if let Some(c) = b.config.config() {
            if let Ok(Value::Object(o)) = serde_json::to_value(c) {
                config_base = o;
            }
        }
    }
    for l in &layers {
        descs.push(json!({"mediaType": GZIP_LAYER, "digest": l.blob, "size": l.size}));
        diff_ids.push(l.diff_id.clone());
    }
    descs.push(json!({"mediaType": GZIP_LAYER, "digest": own_blob, "size": own.blob.len()}));
    diff_ids.push(own.diff_id.clone());

    let created = super::index::rfc3339(epoch as i64);
    let licenses: BTreeMap<&str, Option<String>> = layers
        .iter()
        .flat_map(|l| l.licenses.iter().map(|(k, v)| (k.as_str(), v.clone())))
        .collect();
    let sbom_packages: Vec<sbom::SbomPackage<'_>> = lock
        .packages
        .iter()
        .map(|p| sbom::SbomPackage {
            package: p,
            license: licenses.get(p.name.as_str()).cloned().flatten(),
        })
        .collect();
    let sbom_blob = store.put_blob(&sbom::document(&reference, &key, &created, &sbom_packages))?;

    let config = image_config(&recipe, config_base, &diff_ids, &created);
    let config_bytes = serde_json::to_vec(&config).expect("config serialises");
    let config_digest = store.put_blob(&config_bytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": descs,
        "annotations": {
            SBOM_ANNOTATION: sbom_blob,
            RECIPE_ANNOTATION: format!("sha256:{key}"),
            "org.opencontainers.image.created": created,
        },
    });
    Ok(Prepared {
        key,
        outcome: Outcome::Manifest {
            reference,
            bytes: serde_json::to_vec(&manifest).expect("manifest serialises"),
        },
        notes,
    })
}

/// The cache key of an image: the digest of everything it is made from.
fn cache_key(
    recipe: &Recipe,
    lock: &RecipeLock,
    base: Option<&Image>,
    host_files: &[(String, Vec<Entry>)],
    clamp: Option<u64>,
) -> String {
    let mut h = Sha256::new();
    for part in [
        LAYER_FORMAT.as_bytes(),
        recipe.text.as_bytes(),
        lock.to_yaml().as_bytes(),
        base.map(|b| b.manifest_digest.as_str())
            .unwrap_or("")
            .as_bytes(),
        clamp.map(|c| c.to_string()).unwrap_or_default().as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for (path, entries) in host_files {
        h.update(path.as_bytes());
        for e in entries {
            h.update(e.path.as_bytes());
            if let Kind::File(d) = &e.kind {
                h.update(Sha256::digest(d));
            }
        }
    }
    hex::encode(h.finalize())
}

/// The image named `reference` when it was built from `key`: remembered in this store,
/// or carried here by `save`/`load` (its manifest names the recipe digest it was built
/// from).
fn cached(store: &Store, reference: &str, key: &str) -> Result<Option<Image>, RecipeError> {
    let Some(image) = store.get(reference, &PullOptions::default())? else {
        return Ok(None);
    };
    let built_from = || -> Option<String> {
        let m = store.manifest(&image.manifest_digest).ok()?;
        m.annotations().as_ref()?.get(RECIPE_ANNOTATION).cloned()
    };
    let hit = remembered(store, key).as_deref() == Some(image.manifest_digest.as_str())
        || built_from().as_deref() == Some(format!("sha256:{key}").as_str());
    Ok(hit.then_some(image))
}

/// What the store holds for a recipe, looked up without building anything.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// Built from the recipe, its lock and its base as they are now; the store names it
    /// `localhost/NAME:TAG` after the recipe's `name` and `tag`.
    Built {
        name: String,
        tag: String,
        image: Box<Image>,
    },
    /// Not in the store as the files now say: why, as a clause ("its lock ... is stale").
    Missing(String),
}

/// The image that `build` would give for the recipe at `path` (and the recipes it is
/// based on), if the store already has it: found exactly as `build` finds it, by the
/// digest of recipe, lock, host files and base, but with no lock written, no index
/// read, nothing built and no network. For those who must name an image without
/// making it (`sandrun export`).
pub fn find_built(store: &Store, path: &Path) -> Result<Lookup, RecipeError> {
    let offline = PullOptions {
        offline: true,
        ..Default::default()
    };
    let clamp = source_date_epoch();
    let mut base: Option<Image> = None;
    let mut found = None;
    for recipe in load_chain(path)?.into_iter().rev() {
        if let Base::Image(reference) = &recipe.base {
            match store.get(reference, &offline)? {
                Some(image) => base = Some(image),
                None => {
                    return Ok(Lookup::Missing(format!(
                        "the base image {reference} of {} is not in the store",
                        recipe.path.display()
                    )))
                }
            }
        }
        let lock_file = lock_path(&recipe.path);
        if !lock_file.is_file() {
            return Ok(Lookup::Missing(format!(
                "{} has no lock file ({})",
                recipe.path.display(),
                lock_file.display()
            )));
        }
        let lock = RecipeLock::read(&lock_file)?;
        if let Some(why) = stale(&recipe, &lock) {
            return Ok(Lookup::Missing(format!(
                "its lock {} is stale: {why}",
                lock_file.display()
            )));
        }
        let host_files = read_host_files(&recipe)?;
        let key = cache_key(&recipe, &lock, base.as_ref(), &host_files, clamp);
        let reference = recipe.reference();
        match cached(store, &reference, &key)? {
            Some(image) => {
                base = Some(image.clone());
                found = Some(Lookup::Built {
                    name: recipe.name.clone(),
                    tag: recipe.tag.clone(),
                    image: Box::new(image),
                });
            }
            None => {
                return Ok(Lookup::Missing(format!(
                    "{reference} is not built from {} and its lock as they are now",
                    recipe.path.display()
                )))
            }
        }
    }
    Ok(found.expect("a chain has at least one recipe"))
}

fn package_layers(
    store: &Store,
    archives: &Archives,
    lock: &RecipeLock,
    clamp: Option<u64>,
) -> Result<Vec<PackageLayer>, RecipeError> {
    let dir = store.root().join("debian/layers");
    std::fs::create_dir_all(&dir).map_err(|e| RecipeError::read(&dir, e))?;
    let groups = layer_groups(lock);
    // Largest first, so that two workers finish together.
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(groups[i].iter().map(|p| p.size).sum::<u64>()));
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Results = BTreeMap<usize, Result<PackageLayer, RecipeError>>;
    let results: std::sync::Mutex<Results> = Default::default();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(groups.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&i) = order.get(n) else { break };
                let r = group_layer(store, archives, &dir, &groups[i], clamp);
                let failed = r.is_err();
                results.lock().expect("results lock").insert(i, r);
                if failed {
                    // Stop handing out work; the first error is reported.
                    next.store(usize::MAX / 2, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let results = results.into_inner().expect("results lock");
    let mut out = Vec::with_capacity(groups.len());
    for (_, r) in results {
        out.push(r?);
    }
    Ok(out)
}

/// The layer of one group of packages: remembered, else made from their `.deb` files.
fn group_layer(
    store: &Store,
    archives: &Archives,
    dir: &Path,
    group: &[&LockedPackage],
    clamp: Option<u64>,
) -> Result<PackageLayer, RecipeError> {
    let key = {
        let mut h = Sha256::new();
        h.update(LAYER_FORMAT);
        for p in group {
            h.update(&p.sha256);
        }
        h.update(clamp.map(|c| c.to_string()).unwrap_or_default());
        hex::encode(h.finalize())
    };
    let meta_path = dir.join(&key);
    if let Ok(bytes) = std::fs::read(&meta_path) {
        if let Ok(l) = serde_json::from_slice::<PackageLayer>(&bytes) {
            if store.has_blob(&l.blob) {
                return Ok(l);
            }
        }
    }
    let mut entries = Vec::new();
    let mut licenses = BTreeMap::new();
    for p in group {
        let file = archives.fetch(&p.url, &p.sha256, Some(p.size).filter(|&s| s > 0))?;
        let bytes = std::fs::read(&file).map_err(|e| RecipeError::read(&file, e))?;
        let contents =
            deb::contents(&bytes, &p.name, clamp).map_err(|e| RecipeError::BadContent {
                what: format!("{} {} ({})", p.name, p.version, p.url),
                reason: e.to_string(),
            })?;
        licenses.insert(
            p.name.clone(),
            contents.copyright.as_deref().and_then(sbom::license_of),
        );
        entries.extend(contents.entries);
    }
    let layer = layer::write(&layer::canonical(entries, clamp.unwrap_or(0))).map_err(|e| {
        RecipeError::BadContent {
            what: group
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            reason: format!("writing their layer: {e}"),
        }
    })?;
    let blob = store.put_blob(&layer.blob)?;
    let l = PackageLayer {
        blob,
        size: layer.blob.len() as u64,
        diff_id: layer.diff_id,
        licenses,
    };
    store.layout().write_atomic(
        &meta_path,
        &serde_json::to_vec(&l).expect("layer meta serialises"),
    )?;
    Ok(l)
}

/// Host files of the recipe, read now (their contents are part of the cache key): for
/// each `from:` entry, the entries it contributes (the file, and with `libraries` the
/// shared libraries it loads).
fn read_host_files(recipe: &Recipe) -> Result<Vec<(String, Vec<Entry>)>, RecipeError> {
    let mut out = Vec::new();
    for f in &recipe.files {
        let FileKind::Host { from, libraries } = &f.kind else {
            continue;
        };
        let src = recipe.dir().join(from);
        let bad = |reason: String| RecipeError::HostFile {
            loc: f.loc.clone(),
            path: src.clone(),
            reason,
        };
        let data = std::fs::read(&src).map_err(|e| bad(e.to_string()))?;
        let meta = std::fs::metadata(&src).map_err(|e| bad(e.to_string()))?;
        let mut entries = vec![Entry {
            path: f.path.trim_start_matches('/').to_string(),
            kind: Kind::File(data.clone()),
            mode: f
                .mode
                .unwrap_or(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777),
            uid: f.uid,
            gid: f.gid,
            mtime: 0,
        }];
        if *libraries {
            for lib in super::elf::closure(&src, &data).map_err(bad)? {
                let bytes =
                    std::fs::read(&lib).map_err(|e| bad(format!("{}: {e}", lib.display())))?;
                entries.push(Entry {
                    path: lib
                        .display()
                        .to_string()
                        .trim_start_matches('/')
                        .to_string(),
                    kind: Kind::File(bytes),
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    mtime: 0,
                });
            }
        }
        out.push((f.path.clone(), entries));
    }
    Ok(out)
}

/// `/etc/passwd`, `/etc/group` and the recipe's files, directories and symlinks.
fn own_entries(recipe: &Recipe, host: Vec<(String, Vec<Entry>)>, epoch: u64) -> Vec<Entry> {
    let mut out = Vec::new();
    let entry = |path: &str, kind: Kind, mode: u32, uid: u32, gid: u32| Entry {
        path: path.trim_start_matches('/').to_string(),
        kind,
        mode,
        uid,
        gid,
        mtime: epoch,
    };
    let declared = |p: &str| recipe.files.iter().any(|f| f.path == p);
    if !declared("/etc/passwd") {
        let mut passwd = String::from("root:x:0:0:root:/root:/bin/sh\n");
        for u in &recipe.users {
            passwd.push_str(&format!(
                "{}:x:{}:{}:{}:{}:{}\n",
                u.name, u.uid, u.gid, u.name, u.home, u.shell
            ));
        }
        passwd.push_str("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n");
        out.push(entry(
            "/etc/passwd",
            Kind::File(passwd.into_bytes()),
            0o644,
            0,
            0,
        ));
    }
    if !declared("/etc/group") {
        let mut group = String::from("root:x:0:\n");
        for g in &recipe.groups {
            group.push_str(&format!("{}:x:{}:{}\n", g.name, g.gid, g.members.join(",")));
        }
        group.push_str("nogroup:x:65534:\n");
        out.push(entry(
            "/etc/group",
            Kind::File(group.into_bytes()),
            0o644,
            0,
            0,
        ));
    }
    for f in &recipe.files {
        match &f.kind {
            FileKind::Content(text) => out.push(entry(
                &f.path,
                Kind::File(text.clone().into_bytes()),
                f.mode.unwrap_or(0o644),
                f.uid,
                f.gid,
            )),
            FileKind::Directory => out.push(entry(
                &f.path,
                Kind::Dir,
                f.mode.unwrap_or(0o755),
                f.uid,
                f.gid,
            )),
            FileKind::Symlink(t) => out.push(entry(
                &f.path,
                Kind::Symlink(t.clone()),
                0o777,
                f.uid,
                f.gid,
            )),
            FileKind::Host { .. } => {}
        }
    }
    for (_, entries) in host {
        out.extend(entries.into_iter().map(|e| Entry { mtime: epoch, ..e }));
    }
    out
}

fn image_config(
    recipe: &Recipe,
    mut config: Map<String, Value>,
    diff_ids: &[String],
    created: &str,
) -> Value {
    let s = &recipe.config;
    let mut env: Vec<String> = config
        .get("Env")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    if env.is_empty() {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    for (k, v) in &s.env {
        env.retain(|e| e.split_once('=').map(|x| x.0) != Some(k.as_str()));
        env.push(format!("{k}={v}"));
    }
    config.insert("Env".into(), json!(env));
    if let Some(e) = &s.entrypoint {
        config.insert("Entrypoint".into(), json!(e));
        // As Docker does: a new entrypoint drops the base's cmd unless one is given.
        config.remove("Cmd");
    }
    if let Some(c) = &s.cmd {
        config.insert("Cmd".into(), json!(c));
    }
    if let Some(w) = &s.workdir {
        config.insert("WorkingDir".into(), json!(w));
    }
    if let Some(u) = &s.user {
        config.insert("User".into(), json!(u));
    }
    if let Some(sig) = &s.stop_signal {
        config.insert("StopSignal".into(), json!(sig));
    }
    if !s.ports.is_empty() {
        let mut ports = config
            .get("ExposedPorts")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        for p in &s.ports {
            ports.insert(p.clone(), json!({}));
        }
        config.insert("ExposedPorts".into(), Value::Object(ports));
    }
    if !s.labels.is_empty() {
        let mut labels = config
            .get("Labels")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        for (k, v) in &s.labels {
            labels.insert(k.clone(), json!(v));
        }
        config.insert("Labels".into(), Value::Object(labels));
    }
    config.retain(|_, v| !v.is_null());
    json!({
        "architecture": oci_architecture(&recipe.architecture),
        "os": "linux",
        "created": created,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    })
}

/// Debian architecture -> OCI (GOARCH) name.
fn oci_architecture(debian: &str) -> &str {
    match debian {
        "i386" => "386",
        "armhf" | "armel" => "arm",
        "ppc64el" => "ppc64le",
        other => other,
    }
}

/// `sandrun lock images/NAME.yaml`: resolves the recipe afresh and writes its lock.
pub fn lock(
    store: &Store,
    path: &Path,
    offline: bool,
) -> Result<(RecipeLock, Vec<String>), RecipeError> {
    let recipe = model::load(path)?;
    let archives = Archives::new(store, offline)?;
    let lock = resolve_lock(&recipe, &archives)?;
    lock.write(&lock_path(path))?;
    Ok((lock, archives.take_notes()))
}

/// The lock of the recipe at `path`, written only when it is missing or no longer fits
/// the recipe (what `sandrun lock PIPELINE` does for the recipes a pipeline names).
/// Returns whether it was written.
pub fn lock_if_needed(
    store: &Store,
    path: &Path,
    offline: bool,
) -> Result<(bool, Vec<String>), RecipeError> {
    let recipe = model::load(path)?;
    let lp = lock_path(path);
    if lp.is_file() && stale(&recipe, &RecipeLock::read(&lp)?).is_none() {
        return Ok((false, Vec::new()));
    }
    let archives = Archives::new(store, offline)?;
    let lock = resolve_lock(&recipe, &archives)?;
    lock.write(&lp)?;
    Ok((true, archives.take_notes()))
}
