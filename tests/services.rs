//! Real services from the image recipes, end to end, as root and rootless: the README's
//! example (two PostgreSQL servers on port 5432 under different identifiers and a
//! Redis, called by step identifier), a Python HTTP service inside a step group reached
//! as `GroupId_StepId` and through a host port, a service that crashes, and a locked
//! rerun on a host with no network at all.
//!
//! The recipe images are built once per build of sandrun and shared by every test (and
//! every test process) as a `sandrun save` archive that each test loads into its own
//! fresh store; the Debian packages come through the shared download cache.

mod prereq;
mod support;

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{modes, Mode, Run, Sandbox};

const RECIPES: [&str; 3] = ["postgres", "redis", "python"];

use support::{download_cache, sandrun_with_downloads as sandrun};

fn repo_file(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The repository's recipes and locks, copied into the sandbox's `images/`.
fn with_recipes(sb: &Sandbox) {
    for name in RECIPES {
        for ext in ["yaml", "lock"] {
            let f = format!("images/{name}.{ext}");
            sb.write(&f, &repo_file(&f));
        }
    }
}

/// A pipeline naming every recipe (what `save` carries).
fn all_recipes_pipeline() -> String {
    let steps: String = RECIPES
        .iter()
        .map(|r| {
            format!("- step:\n    type: Run\n    name: {r}\n    identifier: {r}\n    spec:\n      image: ./images/{r}.yaml\n      shell: Sh\n      command: \"true\"\n")
        })
        .collect();
    support::stage("", &steps)
}

/// The recipe images, built once for this build of sandrun and these recipes, saved as
/// an archive every user can read. Test processes run in parallel: the first one
/// builds under an exclusive lock, the others wait for it and find the archive.
fn prebuilt_archive() -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    support::binary().hash(&mut h);
    for name in RECIPES {
        repo_file(&format!("images/{name}.yaml")).hash(&mut h);
        repo_file(&format!("images/{name}.lock")).hash(&mut h);
    }
    let archive =
        std::env::temp_dir().join(format!("sandrun-test-services-{:016x}.tar", h.finish()));
    let lock = File::create(std::env::temp_dir().join("sandrun-test-services.lock")).unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    if archive.exists() {
        return archive;
    }
    let sb = Sandbox::new(modes()[0]);
    with_recipes(&sb);
    sb.write("all.yaml", &all_recipes_pipeline());
    for name in RECIPES {
        sandrun(&sb, &["build", &format!("images/{name}.yaml")]).assert_code(0);
    }
    let staged = sb.dir.path().join("images.tar");
    sandrun(&sb, &["save", "-o", staged.to_str().unwrap(), "all.yaml"]).assert_code(0);
    let partial = archive.with_extension(format!("tar.{}", std::process::id()));
    std::fs::copy(&staged, &partial).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&partial, &archive).unwrap();
    archive
}

/// A fresh sandbox holding the recipes, with their images loaded into its store.
fn seeded(mode: Mode) -> Sandbox {
    let archive = prebuilt_archive();
    let sb = Sandbox::new(mode);
    with_recipes(&sb);
    sandrun(&sb, &["load", archive.to_str().unwrap()]).assert_code(0);
    sb
}

/// The README's first example: every service answers by its step identifier.
#[test]
fn the_example_stage_reaches_two_postgres_and_a_redis_by_step_identifier() {
    for mode in modes() {
        let sb = seeded(mode);
        sb.write(
            "examples/services.yaml",
            &repo_file("examples/services.yaml"),
        );
        let run = sandrun(&sb, &["run", "examples/services.yaml"]);
        run.assert_code(0)
            .assert_stdout("orders_db answers: 2 orders")
            .assert_stdout("users_db answers:  1 user")
            .assert_stdout("cache answers: hello from the cache, visits=2");
        // Two servers on 5432, each at its own address.
        let addr = |line: &str| -> String {
            let l = run.stdout.lines().find(|l| l.contains(line)).unwrap();
            l.rsplit(' ').next().unwrap().to_string()
        };
        assert_ne!(
            addr("orders_db answers:"),
            addr("users_db answers:"),
            "{}",
            run.all()
        );
        for step in [
            "orders_db",
            "users_db",
            "cache",
            "query_databases",
            "use_cache",
        ] {
            assert!(!run.summary_row(step).contains("FAILED"), "{}", run.all());
        }
    }
}

/// A Python HTTP server in a step group: another step reaches it as `web_server`, and
/// the host through its port binding on 127.0.0.1.
#[test]
fn a_python_service_in_a_group_answers_by_group_name_and_host_port() {
    for mode in modes() {
        let sb = seeded(mode);
        let port = support::free_port();
        sb.write("site/hello.txt", "hello from python\n");
        sb.write(
            "ci.yaml",
            &support::stage(
                "",
                &format!(
                    r#"- stepGroup:
    name: web
    identifier: web
    steps:
      - step:
          type: Background
          name: server
          identifier: server
          spec:
            image: ./images/python.yaml
            shell: Sh
            command: exec python3 -m http.server 8000 --directory site
            portBindings:
              "{port}": "8000"
- step:
    type: Run
    name: client
    identifier: client
    timeout: 2m
    spec:
      image: ./images/python.yaml
      shell: Sh
      command: |
        python3 - <<'PY'
        import time, urllib.request
        for _ in range(600):
            try:
                body = urllib.request.urlopen("http://web_server:8000/hello.txt", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        print("from the group:", body.decode().strip())
        PY
        # Stay until the host has fetched through the port binding.
        i=0; until [ -e fetched ]; do i=$((i+1)); [ $i -lt 600 ] || exit 1; sleep 0.1; done
"#
                ),
            ),
        );
        let running = support::spawn_with_until(
            &sb,
            &["run", "ci.yaml"],
            &[("SANDRUN_DOWNLOAD_CACHE", download_cache().to_str().unwrap())],
            "http.server 8000",
        );
        let body = support::http_get(port, "/hello.txt");
        assert_eq!(String::from_utf8_lossy(&body), "hello from python\n");
        sb.write("fetched", "");
        let run = running.finish();
        run.assert_code(0)
            .assert_stdout("from the group: hello from python");
    }
}

/// A service that crashes fails the stage; the summary names it and shows its last
/// lines (here the postgres entrypoint refusing to start without a password).
#[test]
fn a_crashing_service_fails_the_stage_with_its_last_lines() {
    for mode in modes() {
        let sb = seeded(mode);
        sb.write(
            "ci.yaml",
            &support::stage(
                "",
                r#"- step:
    type: Background
    name: broken db
    identifier: broken_db
    spec:
      image: ./images/postgres.yaml
      shell: Sh
      command: |
        docker-entrypoint.sh postgres || { code=$?; touch crashed; exit $code; }
- step:
    type: Run
    name: wait
    identifier: wait
    timeout: 2m
    spec:
      image: ./images/postgres.yaml
      shell: Sh
      command: |
        i=0; until [ -e crashed ]; do i=$((i+1)); [ $i -lt 600 ] || exit 1; sleep 0.1; done
        sleep 2
- step:
    type: Run
    name: after
    identifier: after
    spec:
      image: ./images/postgres.yaml
      shell: Sh
      command: echo should not run
"#,
            ),
        );
        let run = sandrun(&sb, &["run", "ci.yaml"]);
        run.assert_code(1)
            .assert_stdout("service died while the stage was running: exit code 1")
            .assert_stdout(
                "│ error: the database is uninitialised and POSTGRES_PASSWORD is not set;",
            );
        assert!(
            run.summary_row("broken_db").contains("FAILED"),
            "{}",
            run.all()
        );
        assert!(
            run.summary_row("after").contains("skipped"),
            "{}",
            run.all()
        );
        assert!(!run.stdout.contains("should not run\n"), "{}", run.all());
    }
}

/// `sandrun ARGS` as the sandbox's user, in a network namespace of its own that has
/// nothing but loopback: a host with no network at all. Root makes the namespace, then
/// (rootless mode) drops to the test user, who runs sandrun there as on any host.
fn without_network(sb: &Sandbox, args: &[&str]) -> Run {
    let mut inner = String::from("ip link set lo up && exec");
    if sb.mode == Mode::Rootless {
        let (uid, gid) = support::test_user().expect("test user");
        inner += &format!(" setpriv --reuid={uid} --regid={gid} --clear-groups");
    }
    inner += &format!(" {}", support::binary().display());
    for a in args {
        inner += &format!(" '{a}'");
    }
    let out = Command::new("unshare")
        .args(["--net", "--", "sh", "-c", &inner])
        .current_dir(sb.workspace())
        .env("HOME", sb.home())
        .env("SANDRUN_HOME", sb.home().join("store"))
        .env("NO_COLOR", "1")
        .env_remove("SANDRUN_DOWNLOAD_CACHE")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("XDG_DATA_HOME")
        .output()
        .expect("cannot run unshare");
    Run::from(out)
}

/// lock, save, a fresh store, load, then `run --locked --offline` where there is no
/// network: the rerun needs none (nothing to connect to could even be reached).
#[test]
fn a_locked_rerun_from_a_saved_archive_runs_without_any_network() {
    if !prereq::require(
        support::is_root(),
        "root, to make a network namespace with no network (CI runs the suite as root)",
    ) {
        return;
    }
    for mode in modes() {
        let sb = seeded(mode);
        sb.write(
            "examples/services.yaml",
            &repo_file("examples/services.yaml"),
        );
        sandrun(&sb, &["lock", "examples/services.yaml"]).assert_code(0);
        let archive = sb.dir.path().join("carried.tar");
        sandrun(
            &sb,
            &[
                "save",
                "-o",
                archive.to_str().unwrap(),
                "examples/services.yaml",
            ],
        )
        .assert_code(0);

        let airgapped = Sandbox::new(mode);
        with_recipes(&airgapped);
        airgapped.write(
            "examples/services.yaml",
            &repo_file("examples/services.yaml"),
        );
        // The lock written beside the pipeline goes along with it.
        for e in std::fs::read_dir(sb.workspace().join("examples"))
            .unwrap()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != "services.yaml" {
                let text = std::fs::read_to_string(e.path()).unwrap();
                airgapped.write(&format!("examples/{name}"), &text);
            }
        }
        let copied = airgapped.dir.path().join("carried.tar");
        std::fs::copy(&archive, &copied).unwrap();
        if mode == Mode::Rootless {
            let (uid, gid) = support::test_user().unwrap();
            nix::unistd::chown(&copied, Some(uid.into()), Some(gid.into())).unwrap();
        }
        without_network(&airgapped, &["load", copied.to_str().unwrap()]).assert_code(0);
        without_network(
            &airgapped,
            &["run", "--locked", "--offline", "examples/services.yaml"],
        )
        .assert_code(0)
        .assert_stdout("orders_db answers: 2 orders")
        .assert_stdout("cache answers: hello from the cache");
        // And the namespace really had no way out: a connection to a public address fails.
        let probe = Command::new("unshare")
            .args(["--net", "--", "sh", "-c", "ip route get 1.1.1.1"])
            .output()
            .unwrap();
        assert!(
            !probe.status.success(),
            "a fresh network namespace has a route"
        );
    }
}
