//! Image recipes end to end: `sandrun lock` and `sandrun build` against Debian's real
//! archive (only busybox-static, one small `.deb`, is downloaded; indexes and `.deb`
//! files are kept between tests and test runs in a shared download cache), and a recipe
//! used as a step's image, as root and rootless.

mod prereq;
mod support;

use std::path::Path;

use support::{modes, Mode, Run, Sandbox};

use support::{download_cache, sandrun_with_downloads as sandrun};

/// The repository's busybox recipe and lock, copied into the sandbox's `images/`.
fn with_busybox(sb: &Sandbox) {
    with_recipe(sb, "busybox");
}

/// The repository's recipe NAME and its lock, copied into the sandbox's `images/`.
fn with_recipe(sb: &Sandbox, name: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("images");
    for f in [format!("{name}.yaml"), format!("{name}.lock")] {
        sb.write(
            &format!("images/{f}"),
            &std::fs::read_to_string(src.join(&f)).unwrap(),
        );
    }
}

/// `built localhost/busybox:1.35 sha256:...` -> the digest.
fn built_digest(run: &Run) -> String {
    run.stdout
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest\n{}", run.all()))
        .to_string()
}

fn lock_field<'a>(lock: &'a str, field: &str) -> &'a str {
    lock.lines()
        .find_map(|l| l.strip_prefix(&format!("  {field}: ")))
        .unwrap_or_else(|| panic!("no {field} in the lock"))
}

#[test]
fn same_recipe_gives_the_same_digest_in_fresh_stores_with_its_sbom() {
    let mut digests = Vec::new();
    let mut all_modes = modes();
    all_modes.push(all_modes[0]);
    for mode in all_modes {
        let sb = Sandbox::new(mode);
        with_busybox(&sb);
        let run = sandrun(&sb, &["build", "images/busybox.yaml"]);
        run.assert_code(0)
            .assert_stdout("built localhost/busybox:1.35");
        digests.push(built_digest(&run));
        // Unchanged: found by the digest of recipe and lock, nothing rebuilt.
        let again = sandrun(&sb, &["build", "images/busybox.yaml"]);
        again
            .assert_code(0)
            .assert_stdout("unchanged localhost/busybox:1.35");
        assert_eq!(built_digest(&again), digests[0]);
        sandrun(&sb, &["images"])
            .assert_code(0)
            .assert_stdout("localhost/busybox:1.35");

        let sbom = sandrun(&sb, &["images", "--sbom", "localhost/busybox:1.35"]);
        sbom.assert_code(0);
        let doc: serde_json::Value = serde_json::from_str(&sbom.stdout).unwrap();
        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        assert_eq!(doc["name"], "localhost/busybox:1.35");
        let lock = std::fs::read_to_string(sb.workspace().join("images/busybox.lock")).unwrap();
        let pkg = doc["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "busybox-static")
            .expect("busybox-static in the SBOM");
        assert_eq!(pkg["versionInfo"], lock_field(&lock, "version"));
        assert_eq!(pkg["checksums"][0]["algorithm"], "SHA256");
        assert_eq!(
            pkg["checksums"][0]["checksumValue"],
            lock_field(&lock, "sha256")
        );
        assert_eq!(pkg["downloadLocation"], lock_field(&lock, "url"));
        assert!(pkg["externalRefs"][0]["referenceLocator"]
            .as_str()
            .unwrap()
            .starts_with("pkg:deb/debian/busybox-static@1%3A1.35.0"));
        assert!(doc["relationships"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |r| r["relationshipType"] == "CONTAINS" && r["relatedSpdxElement"] == pkg["SPDXID"]
            ));
    }
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
}

#[test]
fn a_tampered_lock_is_refused_and_nothing_is_stored() {
    let sb = Sandbox::new(modes()[0]);
    with_busybox(&sb);
    let lock_file = sb.workspace().join("images/busybox.lock");
    let lock = std::fs::read_to_string(&lock_file).unwrap();
    let good = lock_field(&lock, "sha256").to_string();
    let mut bad = good.clone().into_bytes();
    bad[0] = if bad[0] == b'0' { b'1' } else { b'0' };
    let bad = String::from_utf8(bad).unwrap();
    sb.write("images/busybox.lock", &lock.replace(&good, &bad));
    let run = sandrun(&sb, &["build", "images/busybox.yaml"]);
    run.assert_code(1).assert_stderr(&format!("expected {bad}"));
    let images = sandrun(&sb, &["images"]);
    assert!(!images.stdout.contains("busybox"), "{}", images.all());
    let store = sb.home().join("store");
    assert_eq!(std::fs::read_dir(store.join("tmp")).unwrap().count(), 0);
    assert!(!store.join("debian/by-hash").join(&bad).exists());

    // Not a hash at all: refused while reading the lock.
    sb.write("images/busybox.lock", &lock.replace(&good, "abc"));
    sandrun(&sb, &["build", "images/busybox.yaml"])
        .assert_code(1)
        .assert_stderr("is not 64 lowercase hex digits");
}

#[test]
fn an_offline_rebuild_uses_the_packages_in_the_store() {
    let sb = Sandbox::new(modes()[0]);
    with_busybox(&sb);
    sandrun(&sb, &["build", "images/busybox.yaml"]).assert_code(0);
    // A changed recipe, with the package layers forgotten: the layer is made again
    // from the .deb kept in the store, without the shared cache and without network.
    let recipe = std::fs::read_to_string(sb.workspace().join("images/busybox.yaml")).unwrap();
    sb.write(
        "images/busybox.yaml",
        &recipe.replace(
            "files:\n",
            "files:\n  - {path: /etc/motd, content: offline}\n",
        ),
    );
    let store = sb.home().join("store");
    std::fs::remove_dir_all(store.join("debian/layers")).unwrap();
    let run = Run::from(
        sb.command(["--offline", "build", "images/busybox.yaml"])
            .env_remove("SANDRUN_DOWNLOAD_CACHE")
            .output()
            .unwrap(),
    );
    run.assert_code(0)
        .assert_stdout("built localhost/busybox:1.35");

    // A package that is not in the store cannot be had offline: said plainly.
    std::fs::remove_dir_all(store.join("debian")).unwrap();
    std::fs::remove_dir_all(store.join("recipes")).unwrap();
    sb.write(
        "images/busybox.yaml",
        &recipe.replace(
            "files:\n",
            "files:\n  - {path: /etc/motd, content: again}\n",
        ),
    );
    let run = Run::from(
        sb.command(["--offline", "build", "images/busybox.yaml"])
            .env_remove("SANDRUN_DOWNLOAD_CACHE")
            .output()
            .unwrap(),
    );
    run.assert_code(1)
        .assert_stderr("--offline forbids downloading");
}

#[test]
fn a_recipe_is_a_step_image_as_root_and_rootless() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        with_busybox(&sb);
        sb.write(
            "ci.yaml",
            &support::stage(
                "",
                "- step:\n    type: Run\n    name: hello\n    identifier: hello\n    spec:\n      image: ./images/busybox.yaml\n      shell: Sh\n      command: echo from-recipe $(id -u); head -1 /etc/passwd; busybox | head -1\n",
            ),
        );
        sandrun(&sb, &["plan", "ci.yaml"])
            .assert_code(0)
            .assert_stdout("built from the recipe");
        let run = sandrun(&sb, &["run", "ci.yaml"]);
        run.assert_code(0)
            .assert_stdout("from-recipe 0")
            .assert_stdout("root:x:0:0:root:/root:/bin/sh")
            .assert_stdout("BusyBox v1.35.0");
        // Pinned and carried offline like any image.
        sandrun(&sb, &["lock", "ci.yaml"])
            .assert_code(0)
            .assert_stdout("busybox.lock is up to date");
        Run::from(
            sb.command(["run", "--locked", "--offline", "ci.yaml"])
                .env_remove("SANDRUN_DOWNLOAD_CACHE")
                .output()
                .unwrap(),
        )
        .assert_code(0)
        .assert_stdout("from-recipe 0");
        let archive = sb.dir.path().join("images.tar");
        sandrun(&sb, &["save", "-o", archive.to_str().unwrap(), "ci.yaml"]).assert_code(0);
        // A fresh store loads the archive and runs the recipe's image offline: the
        // built image is recognised by the recipe digest it carries.
        let other = Sandbox::new(mode);
        with_busybox(&other);
        std::fs::copy(
            sb.workspace().join("ci.yaml"),
            other.workspace().join("ci.yaml"),
        )
        .unwrap();
        let copied = other.dir.path().join("images.tar");
        std::fs::copy(&archive, &copied).unwrap();
        if mode == Mode::Rootless && support::is_root() {
            let (uid, gid) = support::test_user().unwrap();
            nix::unistd::chown(&copied, Some(uid.into()), Some(gid.into())).unwrap();
        }
        sandrun(&other, &["load", copied.to_str().unwrap()]).assert_code(0);
        Run::from(
            other
                .command(["run", "--offline", "ci.yaml"])
                .env_remove("SANDRUN_DOWNLOAD_CACHE")
                .output()
                .unwrap(),
        )
        .assert_code(0)
        .assert_stdout("from-recipe 0");
    }
}

#[test]
fn bad_recipes_are_refused_with_file_and_line() {
    let sb = Sandbox::new(modes()[0]);
    let cases: &[(&str, &str, &str)] = &[
        (
            "unknown.yaml",
            "name: unknown\npackages:\n  - busybox-static\n  - busybox-statik\n",
            "unknown.yaml:4:5: unknown package `busybox-statik` (did you mean `busybox-static`?)",
        ),
        (
            "version.yaml",
            "name: version\npackages:\n  - busybox-static=0.1\n",
            "version.yaml:3:5: cannot satisfy busybox-static (= 0.1)",
        ),
        (
            "conflict.yaml",
            "name: conflict\npackages:\n  - busybox\n  - busybox-static\n",
            "conflict.yaml:4:5: conflicting packages",
        ),
        (
            "malformed.yaml",
            "name: malformed\npackages: [busybox-static]\nconfig:\n  entrypint: [sh]\n",
            "malformed.yaml:4:3: unknown field `entrypint` in `config` (did you mean `entrypoint`?)",
        ),
        (
            "hostfile.yaml",
            "name: hostfile\nfiles:\n  - path: /x\n    from: ./no/such/file\n",
            "hostfile.yaml:3:5: host file",
        ),
        (
            "cycle-a.yaml",
            "name: cycle-a\nbase: ./cycle-b.yaml\n",
            "cycle-b.yaml:2:7: recipe cycle",
        ),
    ];
    sb.write(
        "images/cycle-b.yaml",
        "name: cycle-b\nbase: ./cycle-a.yaml\n",
    );
    for (file, text, expected) in cases {
        sb.write(&format!("images/{file}"), text);
        let run = sandrun(&sb, &["build", &format!("images/{file}")]);
        run.assert_code(1).assert_stderr(expected);
        let lock = sb
            .workspace()
            .join(format!("images/{}", file.replace(".yaml", ".lock")));
        assert!(!lock.exists(), "{file}: a lock was written");
    }
    let images = sandrun(&sb, &["images"]);
    assert!(!images.stdout.contains("localhost/"), "{}", images.all());
    // `lock` reports the same.
    sandrun(&sb, &["lock", "images/unknown.yaml"])
        .assert_code(2)
        .assert_stderr("unknown.yaml:4:5: unknown package");
}

/// The shipped postgres recipe as a Background service, configured the way pipelines
/// written for the official `postgres` image configure it, queried with psql by its
/// step identifier from a Run step using the same recipe.
#[test]
fn postgres_recipe_serves_a_pipeline_written_for_the_official_image() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        with_recipe(&sb, "postgres");
        sb.write(
            "ci.yaml",
            &support::stage(
                "",
                r#"- step:
    type: Background
    name: db
    identifier: db
    spec:
      image: ./images/postgres.yaml
      envVariables:
        POSTGRES_USER: app
        POSTGRES_PASSWORD: secret
        POSTGRES_DB: appdb
- step:
    type: Run
    name: query
    identifier: query
    spec:
      image: ./images/postgres.yaml
      shell: Sh
      envVariables:
        PGPASSWORD: secret
      command: |
        i=0; until pg_isready -q -h db -U app -d appdb; do i=$((i+1)); [ $i -lt 120 ] || exit 1; sleep 0.5; done
        echo "answer=$(psql -h db -U app -d appdb -tAc 'select 40+2')"
        PGPASSWORD=wrong psql -h db -U app -d appdb -tAc 'select 1' || echo refused-wrong-password
"#,
            ),
        );
        let run = sandrun(&sb, &["run", "ci.yaml"]);
        run.assert_code(0)
            .assert_stdout("answer=42")
            .assert_stdout("refused-wrong-password")
            .assert_stdout("listening on IPv4 address \"0.0.0.0\", port 5432");
    }
}

/// The shipped redis recipe as a service, reached with its own redis-cli.
#[test]
fn redis_recipe_serves_redis_cli_by_step_identifier() {
    let sb = Sandbox::new(modes()[0]);
    with_recipe(&sb, "redis");
    with_recipe(&sb, "python");
    sb.write(
        "ci.yaml",
        &support::stage(
            "",
            r#"- step:
    type: Background
    name: cache
    identifier: cache
    spec:
      image: ./images/redis.yaml
- step:
    type: Run
    name: ping
    identifier: ping
    spec:
      image: ./images/redis.yaml
      shell: Sh
      command: |
        redis-cli -h cache set greeting hello >/dev/null
        echo "got=$(redis-cli -h cache get greeting)"
- step:
    type: Run
    name: py
    identifier: py
    spec:
      image: ./images/python.yaml
      shell: Sh
      command: python3 -c 'import json, sqlite3, ssl; print("python", json.dumps([1]))'
"#,
        ),
    );
    sandrun(&sb, &["run", "ci.yaml"])
        .assert_code(0)
        .assert_stdout("got=hello")
        .assert_stdout("python [1]");
}

/// A build killed half-way leaves no image, and the store checks clean.
#[test]
fn an_interrupted_build_leaves_the_store_as_it_was() {
    let sb = Sandbox::new(modes()[0]);
    with_recipe(&sb, "python");
    let mut child = sb
        .command(["build", "images/python.yaml"])
        .env("SANDRUN_DOWNLOAD_CACHE", download_cache())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has started writing layers (bounded wait).
    let layers = sb.home().join("store/debian/layers");
    for _ in 0..600 {
        if std::fs::read_dir(&layers).is_ok_and(|mut d| d.next().is_some()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let images = sandrun(&sb, &["images"]);
    assert!(
        !images.stdout.contains("localhost/python"),
        "{}",
        images.all()
    );
    sandrun(&sb, &["fsck"])
        .assert_code(0)
        .assert_stdout(": 0 problems");
    // And the next build completes from what was kept.
    sandrun(&sb, &["build", "images/python.yaml"])
        .assert_code(0)
        .assert_stdout("built localhost/python:3.11");
}

/// A recipe on top of another recipe, adding a host program with its shared libraries.
#[test]
fn a_recipe_based_on_a_recipe_carries_a_host_program_and_its_libraries() {
    let sb = Sandbox::new(modes()[0]);
    with_busybox(&sb);
    sb.write(
        "images/tools.yaml",
        "name: tools\nbase: ./busybox.yaml\nfiles:\n  - {path: /opt/bin/ls, from: /bin/ls, libraries: true}\n",
    );
    sb.write(
        "ci.yaml",
        &support::stage(
            "",
            "- step:\n    type: Run\n    name: ls\n    identifier: ls\n    spec:\n      image: ./images/tools.yaml\n      shell: Sh\n      command: /opt/bin/ls -d /etc && busybox echo from-base\n",
        ),
    );
    sandrun(&sb, &["run", "ci.yaml"])
        .assert_code(0)
        .assert_stdout("/etc")
        .assert_stdout("from-base");
    let images = sandrun(&sb, &["images"]);
    images
        .assert_stdout("localhost/tools:latest")
        .assert_stdout("localhost/busybox:1.35");
}
