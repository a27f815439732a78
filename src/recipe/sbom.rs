//! The image's software bill of materials: an SPDX 2.3 JSON document listing every
//! Debian package in the image with its version, the sha256 of its `.deb`, where it was
//! downloaded from, a package URL, and its licence where the package's machine-readable
//! copyright file (DEP-5) names one. It is stored as a blob and named by the image
//! manifest's `dev.sandrun.sbom` annotation; `sandrun images --sbom REF` prints it.

use serde_json::{json, Value};

use super::lockfile::LockedPackage;

/// One package and the licence expression found for it.
pub struct SbomPackage<'a> {
    pub package: &'a LockedPackage,
    pub license: Option<String>,
}

/// The SPDX document (compact JSON with sorted keys: the same input, the same bytes).
pub fn document(image: &str, key: &str, created: &str, packages: &[SbomPackage<'_>]) -> Vec<u8> {
    let mut pkgs = vec![json!({
        "SPDXID": "SPDXRef-Image",
        "name": image,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "CONTAINER",
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Image",
    })];
    for (i, p) in packages.iter().enumerate() {
        let l = p.package;
        let id = format!("SPDXRef-Package-{}-{i}", spdx_id_part(&l.name));
        let license = p.license.clone().unwrap_or_else(|| "NOASSERTION".into());
        pkgs.push(json!({
            "SPDXID": id,
            "name": l.name,
            "versionInfo": l.version,
            "supplier": "Organization: Debian",
            "downloadLocation": l.url,
            "filesAnalyzed": false,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": license,
            "copyrightText": "NOASSERTION",
            "sourceInfo": format!("built from Debian source package {}", l.source),
            "checksums": [{"algorithm": "SHA256", "checksumValue": l.sha256}],
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": format!("pkg:deb/debian/{}@{}?arch={}", purl_escape(&l.name), purl_escape(&l.version), l.architecture),
            }],
        }));
        relationships.push(json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }
    let doc: Value = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": image,
        "documentNamespace": format!("urn:sandrun:spdx:{key}"),
        "creationInfo": {
            "created": created,
            "creators": [concat!("Tool: sandrun-", env!("CARGO_PKG_VERSION"))],
        },
        "packages": pkgs,
        "relationships": relationships,
    });
    serde_json::to_vec_pretty(&doc).expect("sbom serialises")
}

fn spdx_id_part(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' })
        .collect()
}

fn purl_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The licence expression of a DEP-5 copyright file, `None` when the file is not
/// machine-readable. Debian's licence short names are mapped to SPDX identifiers where
/// they have one, else kept as `LicenseRef-` names.
pub fn license_of(copyright: &str) -> Option<String> {
    let first = copyright.lines().next()?;
    if !first.starts_with("Format:") {
        return None;
    }
    let mut found: Vec<String> = Vec::new();
    for line in copyright.lines() {
        let Some(v) = line.strip_prefix("License:") else { continue };
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        let alts: Vec<String> = v
            .split(" or ")
            .flat_map(|a| a.split(" | "))
            .map(|a| spdx_name(a.trim().trim_end_matches(',')))
            .collect();
        let expr = if alts.len() > 1 {
            format!("({})", alts.join(" OR "))
        } else {
            alts.into_iter().next().unwrap_or_default()
        };
        if !found.contains(&expr) {
            found.push(expr);
        }
    }
    found.sort();
    (!found.is_empty()).then(|| found.join(" AND "))
}

fn spdx_name(debian: &str) -> String {
    let known = [
        ("GPL-1+", "GPL-1.0-or-later"),
        ("GPL-2", "GPL-2.0-only"),
        ("GPL-2+", "GPL-2.0-or-later"),
        ("GPL-3", "GPL-3.0-only"),
        ("GPL-3+", "GPL-3.0-or-later"),
        ("LGPL-2", "LGPL-2.0-only"),
        ("LGPL-2+", "LGPL-2.0-or-later"),
        ("LGPL-2.1", "LGPL-2.1-only"),
        ("LGPL-2.1+", "LGPL-2.1-or-later"),
        ("LGPL-3", "LGPL-3.0-only"),
        ("LGPL-3+", "LGPL-3.0-or-later"),
        ("AGPL-3+", "AGPL-3.0-or-later"),
        ("GFDL-1.3+", "GFDL-1.3-or-later"),
        ("Expat", "MIT"),
        ("MIT", "MIT"),
        ("BSD-2-clause", "BSD-2-Clause"),
        ("BSD-3-clause", "BSD-3-Clause"),
        ("BSD-4-clause", "BSD-4-Clause"),
        ("ISC", "ISC"),
        ("Zlib", "Zlib"),
        ("zlib", "Zlib"),
        ("Apache-2.0", "Apache-2.0"),
        ("PostgreSQL", "PostgreSQL"),
        ("Artistic", "Artistic-1.0-Perl"),
        ("PSF-2", "Python-2.0"),
        ("MPL-2.0", "MPL-2.0"),
        ("OpenSSL", "OpenSSL"),
        ("CC0-1.0", "CC0-1.0"),
        ("X11", "X11"),
        ("curl", "curl"),
    ];
    known
        .iter()
        .find(|(d, _)| d.eq_ignore_ascii_case(debian))
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| format!("LicenseRef-{}", spdx_id_part(debian)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn licences_from_dep5() {
        let c = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\nLicense: GPL-2\n\nFiles: x/*\nLicense: BSD-3-clause or public-domain\n text\n";
        assert_eq!(
            license_of(c).as_deref(),
            Some("(BSD-3-Clause OR LicenseRef-public-domain) AND GPL-2.0-only")
        );
        assert_eq!(license_of("This is free software.\n"), None);
        assert_eq!(purl_escape("1:2.3+b1"), "1%3A2.3%2Bb1");
    }
}
