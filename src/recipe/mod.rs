//! Images declared by the repository and rebuilt by anyone to the same bits:
//! `images/NAME.yaml` recipes of Debian packages, host files, users and image settings,
//! pinned by `images/NAME.lock`, built without root, apt or a daemon into the same
//! store that pulled images live in (docs/recipes.md is the user's manual).
//!
//! The data flow: `model` parses the recipe (every field with its file:line);
//! `archive` fetches and verifies Debian's signed Release files, package indexes and
//! `.deb` files, keeping them by hash in the store; `index` and `version` read the
//! indexes and compare versions; `resolve` computes the dependency closure; `lockfile`
//! pins it; `deb` unpacks a package; `layer` writes reproducible layers; `elf` finds a
//! host program's libraries; `sbom` writes the SPDX document; `build` puts it together
//! and hands the image to the store.

mod archive;
pub mod build;
mod deb;
mod elf;
mod error;
mod index;
mod layer;
pub mod lockfile;
pub mod model;
mod resolve;
mod sbom;
mod version;

use std::path::Path;

pub use build::{
    build, find_built, lock, lock_if_needed, BuildOptions, Built, Lookup, SBOM_ANNOTATION,
};
pub use error::{Loc, RecipeError};
pub use lockfile::{lock_path, RecipeLock};

/// Whether a step's `image:` names a recipe (`./images/pg.yaml`) rather than an image
/// reference: a relative or absolute path ending in `.yaml` or `.yml`.
pub fn is_recipe_reference(image: &str) -> bool {
    (image.starts_with("./") || image.starts_with("../") || image.starts_with('/'))
        && (image.ends_with(".yaml") || image.ends_with(".yml"))
}

/// Whether the YAML file at `path` is a recipe (rather than a pipeline): it has a
/// top-level `name` and none of a pipeline's top-level keys.
pub fn is_recipe_file(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(root) = crate::pipeline::yaml::parse(&text) else {
        return false;
    };
    let crate::pipeline::yaml::Value::Map(entries) = &root.value else {
        return false;
    };
    let keys: Vec<&str> = entries.iter().filter_map(|(k, _)| k.as_str()).collect();
    keys.contains(&"name")
        && !keys
            .iter()
            .any(|k| matches!(*k, "pipeline" | "stage" | "template"))
}

/// The SBOM of the image `reference` (one built from a recipe), as stored.
pub fn sbom_of(store: &crate::store::Store, reference: &str) -> anyhow::Result<Vec<u8>> {
    let image = store
        .get(reference, &crate::store::PullOptions::default())?
        .ok_or_else(|| anyhow::anyhow!("{reference} is not in the store"))?;
    let manifest = store.manifest(&image.manifest_digest)?;
    let digest = manifest
        .annotations()
        .as_ref()
        .and_then(|a| a.get(SBOM_ANNOTATION))
        .ok_or_else(|| {
            anyhow::anyhow!("{reference} has no SBOM (only images built from recipes have one)")
        })?;
    Ok(store.read_blob(digest, 64 << 20)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_references_and_files() {
        assert!(is_recipe_reference("./images/pg.yaml"));
        assert!(is_recipe_reference("/abs/x.yml"));
        assert!(!is_recipe_reference("postgres:15"));
        assert!(!is_recipe_reference("images/pg.yaml"));
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("r.yaml");
        std::fs::write(&r, "name: x\npackages: [a]\n").unwrap();
        assert!(is_recipe_file(&r));
        let p = dir.path().join("p.yaml");
        std::fs::write(&p, "pipeline:\n  name: x\n").unwrap();
        assert!(!is_recipe_file(&p));
        std::fs::write(&p, "stage:\n  name: x\n").unwrap();
        assert!(!is_recipe_file(&p));
    }
}
