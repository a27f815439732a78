//! `sandrun export kubernetes`: golden files over the pipeline corpus, every refusal with
//! its message, and kubectl's own Go types reading each manifest back.
//!
//! Golden files live in `testdata/export/`: `NAME.yaml` for a pipeline that exports,
//! `NAME.err` for one that is refused. `UPDATE_GOLDEN=1 cargo test --test
//! export_kubernetes` rewrites them; review the diff by eye before committing.

mod prereq;
#[path = "support/registry.rs"]
mod registry;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use sandrun::export::{self, ExportError, ImageFacts, KnownImages, KubeOptions};
use sandrun::plan::{self, PlanInputs};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What `sandrun pull` would have told the export about the corpus's images.
fn known_images() -> KnownImages {
    let facts = |ports: &[u16], entrypoint: &[&str], cmd: &[&str]| ImageFacts {
        exposed_tcp: ports.to_vec(),
        entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
    };
    BTreeMap::from([
        (
            "postgres:16-alpine".to_string(),
            facts(&[5432], &["docker-entrypoint.sh"], &["postgres"]),
        ),
        (
            "redis:7-alpine".to_string(),
            facts(&[6379], &["docker-entrypoint.sh"], &["redis-server"]),
        ),
        (
            "plugins/webhook".to_string(),
            facts(&[], &["/bin/drone-webhook"], &[]),
        ),
    ])
}

/// A git workspace whose codebase facts are always the same (fixed author, dates,
/// branch and remote), so that the golden files do not depend on this checkout.
fn fixed_workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir.path())
            .env("GIT_AUTHOR_NAME", "ci")
            .env("GIT_AUTHOR_EMAIL", "ci@example.com")
            .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
            .env("GIT_COMMITTER_NAME", "ci")
            .env("GIT_COMMITTER_EMAIL", "ci@example.com")
            .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .expect("git (Debian package: git) is needed");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q", "-b", "main"]);
    git(&[
        "remote",
        "add",
        "origin",
        "https://git.example.com/team/app.git",
    ]);
    git(&["commit", "-q", "--allow-empty", "-m", "fixed"]);
    dir
}

/// Plan `path` as `sandrun export` does (no secrets: they stay placeholders) from a
/// fixed workspace.
fn export_file(path: &Path, opts: &KubeOptions) -> Result<String, String> {
    let file = sandrun::pipeline::load(path).map_err(|e| e.to_string())?;
    let workspace = fixed_workspace();
    let inputs = PlanInputs {
        workspace: workspace.path().to_path_buf(),
        secrets: export::secret_markers(&std::fs::read_to_string(path).unwrap()),
        placeholders: true,
        ..Default::default()
    };
    let mut plan = plan::build(&file, &inputs).map_err(|e| e.to_string())?;
    sandrun::run::images::resolve_sources(&mut plan, &Default::default())
        .map_err(|e| e.to_string())?;
    export::kubernetes(&plan, opts, &known_images()).map_err(|e| e.to_string())
}

/// The YAML documents of an export, comments stripped.
fn documents(text: &str) -> Vec<String> {
    text.split("\n---\n")
        .map(|d| {
            d.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

fn check_golden(name: &str, actual: &str) {
    let path = root().join("testdata/export").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert!(
        expected == actual,
        "{} differs from the export (UPDATE_GOLDEN=1 rewrites it); export:\n{actual}",
        path.display()
    );
}

/// The `.yaml` files of `dir` (relative to the crate root), in name order.
fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("yaml"))
        .collect();
    out.sort();
    out
}

/// Every pipeline of the corpus and its golden file, relative to the crate root so that
/// the locations in refusals are stable.
fn corpus() -> Vec<(String, PathBuf)> {
    yaml_files("testdata/pipelines")
        .into_iter()
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            (stem, p.strip_prefix(root()).unwrap().to_path_buf())
        })
        .collect()
}

#[test]
fn every_corpus_pipeline_matches_its_golden_export() {
    std::env::set_current_dir(root()).unwrap();
    let mut exported = 0;
    for (stem, path) in corpus() {
        match export_file(&path, &KubeOptions::default()) {
            Ok(text) => {
                for doc in documents(&text) {
                    let pod: Pod = serde_yaml::from_str(&doc)
                        .unwrap_or_else(|e| panic!("{stem}: not a Pod: {e}\n{doc}"));
                    assert!(pod.spec.is_some(), "{stem}");
                }
                check_golden(&format!("{stem}.yaml"), &text);
                exported += 1;
            }
            Err(message) => check_golden(&format!("{stem}.err"), &format!("{message}\n")),
        }
    }
    assert!(exported >= 2, "only {exported} corpus pipelines export");
}

#[test]
fn job_with_namespace_and_pull_secrets() {
    std::env::set_current_dir(root()).unwrap();
    let opts = KubeOptions {
        job: true,
        namespace: Some("ci".into()),
        pull_secrets: BTreeMap::from([("account.harnessImage".into(), "regcred".into())]),
        ..Default::default()
    };
    let text = export_file(Path::new("testdata/pipelines/kubernetes-build.yaml"), &opts).unwrap();
    check_golden("kubernetes-build.job.yaml", &text);
    let docs = documents(&text);
    assert_eq!(docs.len(), 1);
    let job: Job = serde_yaml::from_str(&docs[0]).unwrap();
    assert_eq!(job.metadata.namespace.as_deref(), Some("ci"));
    let spec = job.spec.unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    assert_eq!(spec.active_deadline_seconds, Some(30 * 60));
    let pod = spec.template.spec.unwrap();
    let secrets: Vec<String> = pod
        .image_pull_secrets
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(secrets, ["regcred"]);
    assert!(!text.contains("has no pull Secret"), "{text}");
}

fn has_env(c: &Container, name: &str, value: &str) -> bool {
    c.env
        .iter()
        .flatten()
        .any(|e| e.name == name && e.value.as_deref() == Some(value))
}

fn pod_of(text: &str) -> PodSpec {
    let pod: Pod = serde_yaml::from_str(&documents(text)[0]).unwrap();
    pod.spec.unwrap()
}

#[test]
fn a_stage_becomes_sidecars_and_sequenced_steps() {
    std::env::set_current_dir(root()).unwrap();
    let text = export_file(
        Path::new("testdata/pipelines/kubernetes-build.yaml"),
        &KubeOptions::default(),
    )
    .unwrap();
    let spec = pod_of(&text);
    let init = spec.init_containers.unwrap();
    let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["sandrun-tools", "database", "cache"]);
    // Background steps: native sidecars; the one running its image's entrypoint is
    // probed on the image's exposed port, the one with its own entrypoint is not.
    assert_eq!(init[1].restart_policy.as_deref(), Some("Always"));
    let probe = init[1].startup_probe.as_ref().unwrap();
    assert_eq!(
        probe.tcp_socket.as_ref().unwrap().port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(5432)
    );
    assert!(init[2].startup_probe.is_none());
    assert_eq!(
        init[2].command.as_deref().unwrap(),
        ["redis-server", "--port", "6380"]
    );
    let limits = init[1].resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, "1Gi");
    assert_eq!(limits["cpu"].0, "1");
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "version",
            "unit",
            "lint",
            "integration-migrate",
            "integration-docker-build",
            "notify"
        ]
    );
    let script = |name: &str| -> String {
        let c = spec.containers.iter().find(|c| c.name == name).unwrap();
        c.command.as_ref().unwrap()[3].clone()
    };
    // The parallel block starts after `version`; the group after both of its branches.
    assert!(script("unit").contains("for m in 'version.done'"));
    assert!(script("lint").contains("for m in 'version.done'"));
    assert!(script("integration-migrate").contains("for m in 'unit.done' 'lint.done'"));
    assert!(script("notify").contains("for m in 'integration.docker_build.done'"));
    // Outputs: written by `version`, read by `unit`'s env and the group's condition.
    assert!(script("version")
        .contains("\"$${VERSION-}\" > '\\''/sandrun/state/out/version/VERSION'\\''"));
    // The pipeline's own `$` doubled, so that the kubelet's `$(NAME)` expansion leaves
    // the script as written.
    assert!(script("unit").contains("go test $$GO_FLAGS ./..."));
    assert!(script("unit").contains("export APP_VERSION=\"$(/sandrun/bin/busybox cat '/sandrun/state/out/version/VERSION' 2>/dev/null)\""));
    assert!(script("integration-migrate").contains("/sandrun/state/out/version/VERSION"));
    // Retry with its intervals, Ignore, the step timeout, `when: All`.
    assert!(script("unit").contains("if [ \"$attempt\" -lt 2 ]"));
    assert!(script("unit").contains("*) /sandrun/bin/busybox sleep 30 ;;"));
    assert!(script("unit").contains("busybox timeout 600 "));
    assert!(script("lint").contains("counted=0; break"));
    assert!(!script("notify").contains("[ ! -e \"$S/failed\" ]"));
    // The plugin runs its image's entrypoint with PLUGIN_* settings.
    assert!(script("notify").contains("set -- '/bin/drone-webhook'"));
    let notify = spec.containers.iter().find(|c| c.name == "notify").unwrap();
    assert!(has_env(notify, "PLUGIN_URLS", "https://hooks.example/ci"));
    // Security, pull policy, Harness's default limits and minimum requests.
    let lint = spec.containers.iter().find(|c| c.name == "lint").unwrap();
    assert_eq!(
        lint.security_context.as_ref().unwrap().run_as_user,
        Some(1000)
    );
    assert_eq!(lint.image_pull_policy.as_deref(), Some("Always"));
    let r = lint.resources.as_ref().unwrap();
    assert_eq!(r.limits.as_ref().unwrap()["cpu"].0, "400m");
    assert_eq!(r.limits.as_ref().unwrap()["memory"].0, "500Mi");
    assert_eq!(r.requests.as_ref().unwrap()["cpu"].0, "10m");
    assert_eq!(r.requests.as_ref().unwrap()["memory"].0, "10Mi");
    let build = spec
        .containers
        .iter()
        .find(|c| c.name == "integration-docker-build")
        .unwrap();
    assert_eq!(
        build.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
    // Stage variables in every step; the shared path and workspace as emptyDirs.
    assert!(has_env(lint, "GO_FLAGS", "-race"));
    let mounts: Vec<&str> = lint
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(mounts, ["/harness", "/var/cache/go", "/sandrun"]);
    assert_eq!(spec.active_deadline_seconds, Some(1800));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    // Names on 127.0.0.1: DNS names as hostAliases, the rest through /etc/hosts.
    let aliases = spec.host_aliases.unwrap();
    assert_eq!(aliases[0].ip, "127.0.0.1");
    assert!(aliases[0]
        .hostnames
        .as_ref()
        .unwrap()
        .contains(&"database".to_string()));
    assert!(init[0].command.as_ref().unwrap()[3].contains("integration_docker_build"));
}

/// The plan of a one-stage pipeline written to a temporary file, as `sandrun export`
/// plans it (secrets as markers).
fn plan_stage(infra: &str, steps: &str) -> sandrun::plan::Plan {
    plan_text(&support::stage(infra, steps))
}

fn plan_text(text: &str) -> sandrun::plan::Plan {
    plan_in(&tempfile::tempdir().unwrap(), text)
}

/// The plan of `text` written in `dir` (the workspace, which may hold recipes).
fn plan_in(dir: &tempfile::TempDir, text: &str) -> sandrun::plan::Plan {
    let path = dir.path().join("stage.yaml");
    std::fs::write(&path, text).unwrap();
    let file = sandrun::pipeline::load(&path).unwrap();
    let inputs = PlanInputs {
        workspace: dir.path().to_path_buf(),
        secrets: export::secret_markers(text),
        placeholders: true,
        ..Default::default()
    };
    plan::build(&file, &inputs).unwrap()
}

/// A one-stage pipeline's export error.
fn refused(infra: &str, steps: &str, images: &KnownImages) -> String {
    let plan = plan_stage(infra, steps);
    match export::kubernetes(&plan, &KubeOptions::default(), images) {
        Ok(text) => panic!("exported:\n{text}"),
        Err(e @ ExportError::Refused(_)) => e.to_string(),
        Err(e) => panic!("{e}"),
    }
}

fn run_step(id: &str, image: &str, extra: &str) -> String {
    format!(
        "- step:\n    type: Run\n    name: {id}\n    identifier: {id}\n    spec:\n      image: {image}\n      shell: Sh\n      command: echo {id}\n{extra}"
    )
}

fn background(id: &str, image: &str, extra: &str) -> String {
    format!(
        "- step:\n    type: Background\n    name: {id}\n    identifier: {id}\n    spec:\n      image: {image}\n{extra}"
    )
}

fn assert_refused(message: &str, needles: &[&str]) {
    for n in needles {
        assert!(message.contains(n), "`{n}` missing from:\n{message}");
    }
    assert!(message.ends_with("nothing was exported"), "{message}");
}

#[test]
fn a_secret_is_a_reference_to_a_kubernetes_secret_never_its_value() {
    let steps = run_step(
        "deploy",
        "alpine:3",
        "      envVariables:\n        TOKEN: <+secrets.getValue(\"account.deploy_token\")>\n",
    );
    // The plan holds a marker where `sandrun run` would hold the value.
    let plan = plan_stage(support::KUBERNETES, &steps);
    let text = export::kubernetes(&plan, &KubeOptions::default(), &KnownImages::new()).unwrap();
    let spec = pod_of(&text);
    let env = spec.containers[0].env.as_ref().unwrap();
    let token = env.iter().find(|e| e.name == "TOKEN").unwrap();
    assert!(token.value.is_none());
    let selector = token
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (selector.name.as_str(), selector.key.as_str()),
        ("deploy-token", "value")
    );
    assert!(
        text.contains("kubectl create secret generic deploy-token"),
        "{text}"
    );
    assert!(!text.contains("sandrun-secret"), "{text}");
}

#[test]
fn a_secret_variable_naming_a_bare_secret_id_is_refused() {
    let text = support::stage(support::KUBERNETES, &run_step("use", "alpine:3", "")).replace(
        "  type: CI\n",
        "  type: CI\n  variables:\n    - name: TOKEN\n      type: Secret\n      value: account.token\n",
    );
    let plan = plan_text(&text);
    let m = export::kubernetes(&plan, &KubeOptions::default(), &KnownImages::new())
        .unwrap_err()
        .to_string();
    assert_refused(
        &m,
        &["step `use`: env `TOKEN` uses a secret the export cannot name (a Secret variable whose value is not `<+secrets.getValue(\"ID\")>`)"],
    );
}

#[test]
fn a_step_without_an_image_is_refused() {
    let steps = "- step:\n    type: Run\n    name: host\n    identifier: host\n    spec:\n      shell: Sh\n      command: make\n";
    let m = refused("", steps, &KnownImages::new());
    assert_refused(
        &m,
        &[
            "stage.yaml:",
            "step `host`: has no image: on Kubernetes there is no host to run it on",
        ],
    );
}

#[test]
fn port_bindings_are_refused_with_harness_reason() {
    let steps = background(
        "web",
        "nginx:1",
        "      portBindings:\n        \"8080\": \"80\"\n",
    ) + &run_step("call", "alpine:3", "");
    let m = refused(support::DOCKER, &steps, &KnownImages::new());
    assert_refused(
        &m,
        &[
            "step `web`: `portBindings` (host 8080 -> container 80): Harness refuses port bindings on Kubernetes",
            "call the service at localhost:80",
        ],
    );
}

#[test]
fn two_services_on_one_port_are_refused_naming_both() {
    let steps = background("orders_db", "postgres:16-alpine", "")
        + &background("users_db", "postgres:16-alpine", "")
        + &run_step("query", "alpine:3", "");
    let m = refused(support::KUBERNETES, &steps, &known_images());
    assert_refused(
        &m,
        &["steps `orders_db` and `users_db` both listen on port 5432"],
    );
    // Moved to another port by its entrypoint (Harness's multiple-Postgres example):
    // the export cannot know its port, so it does not refuse.
    let moved = background("orders_db", "postgres:16-alpine", "")
        + &background(
            "users_db",
            "postgres:16-alpine",
            "      entrypoint: [docker-entrypoint.sh, postgres, -p, \"5433\"]\n",
        )
        + &run_step("query", "alpine:3", "");
    let plan = plan_stage(support::KUBERNETES, &moved);
    export::kubernetes(&plan, &KubeOptions::default(), &known_images()).unwrap();
}

#[test]
fn other_refusals_say_why() {
    let images = known_images();
    let cases: Vec<(String, &[&str])> = vec![
        (
            run_step("named_user", "alpine:3", "      runAsUser: postgres\n"),
            &["step `named_user`: runAsUser `postgres` is not a number"],
        ),
        (
            run_step(
                "secretive",
                "alpine:3",
                "      envVariables:\n        AUTH: Bearer <+secrets.getValue(\"token\")>\n",
            ),
            &["step `secretive`: env `AUTH` uses a secret inside other text: sandrun never writes secret values into manifests"],
        ),
        (
            "- step:\n    type: Run\n    name: inline\n    identifier: inline\n    spec:\n      image: alpine:3\n      shell: Sh\n      command: curl -u ci:<+secrets.getValue(\"token\")> https://example.com\n".to_string(),
            &["step `inline`: its command uses a secret inside other text"],
        ),
        (
            "- step:\n    type: Plugin\n    name: slack\n    identifier: slack\n    spec:\n      image: plugins/slack\n      settings:\n        channel: ci\n".to_string(),
            &["step `slack`: runs its image's own entrypoint, which sandrun does not know for `plugins/slack`", "`sandrun pull`"],
        ),
        (
            run_step("make_v", "alpine:3", "      outputVariables:\n        - name: V\n")
                + &background(
                    "svc",
                    "redis:7-alpine",
                    "      envVariables:\n        V: <+steps.make_v.output.outputVariables.V>\n",
                ),
            &["step `svc`: reads other steps' output variables: as a native sidecar it starts with the Pod"],
        ),
        (
            run_step("pinned", "alpine:<+input>", ""),
            &["step `pinned`: its image is a runtime input without an answer: give it with --set"],
        ),
        (
            background("only", "redis:7-alpine", ""),
            &["stage `test` has no Run or Plugin step"],
        ),
        (
            "- step:\n    type: BuildAndPushDockerRegistry\n    name: push\n    identifier: push\n    spec:\n      connectorRef: docker\n      repo: me/app\n      tags: [latest]\n".to_string()
                + &run_step("after", "alpine:3", ""),
            &["step `push`: `BuildAndPushDockerRegistry` steps cannot run locally", "Kubernetes cannot run it either"],
        ),
    ];
    for (steps, needles) in cases {
        let m = refused(support::KUBERNETES, &steps, &images);
        assert_refused(&m, needles);
    }
}

#[test]
fn the_command_refuses_with_exit_code_2_and_prints_nothing() {
    let out = Command::new(support::binary())
        .args(["export", "kubernetes"])
        .arg(root().join("testdata/pipelines/multiple-postgres.yaml"))
        .env("SANDRUN_CONFIG", "/dev/null")
        .env("SANDRUN_HOME", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step `orders_db`: `portBindings`"), "{err}");
    assert!(err.contains("step `users_db`: `portBindings`"), "{err}");
    let ok = Command::new(support::binary())
        .args(["export", "kubernetes", "--job", "--namespace", "ci"])
        .args(["--pull-secret", "account.harnessImage=regcred"])
        .arg(root().join("testdata/pipelines/docker-in-docker.yaml"))
        .env("SANDRUN_CONFIG", "/dev/null")
        .env("SANDRUN_HOME", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let text = String::from_utf8(ok.stdout).unwrap();
    let job: Job = serde_yaml::from_str(&documents(&text)[0]).unwrap();
    assert_eq!(job.metadata.namespace.as_deref(), Some("ci"));
}

/// kubectl 1.29 or later (the first whose Go types know native sidecars), when
/// installed; a missing or older one fails the test under CI (tests/prereq).
fn have_kubectl() -> bool {
    let out = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output();
    let minor = out.ok().filter(|o| o.status.success()).and_then(|o| {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let minor = v["clientVersion"]["minor"].as_str()?;
        let digits: String = minor.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    prereq::require(
        minor.is_some_and(|m| m >= 29),
        format!(
            "kubectl 1.29 or later (found: {}); Debian's kubernetes-client is 1.20, too old for native sidecars",
            minor.map_or("none".to_string(), |m| format!("1.{m}"))
        ),
    )
}

/// What kubectl printed for `manifest`; its error names the manifest.
fn kubectl(cmd: &mut Command, manifest: &Path) -> String {
    let out = cmd.output().expect("kubectl");
    assert!(
        out.status.success(),
        "{}: {}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every golden manifest of `testdata/export/` (path, text).
fn golden_manifests() -> Vec<(PathBuf, String)> {
    let out: Vec<(PathBuf, String)> = yaml_files("testdata/export")
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    assert!(out.len() >= 5, "only {} golden manifests", out.len());
    out
}

/// A stand-in for a Kubernetes API server on loopback, for `kubectl create
/// --dry-run=client`, which cannot start without one: it serves what kubectl reads
/// before a client dry run and nothing else, as static documents written here:
/// - discovery (`/api`, `/api/v1`, `/apis`, `/apis/batch/v1`), listing Pods and Jobs,
///   which kubectl needs to map each document's kind to a resource;
/// - OpenAPI v3 (`/openapi/v3` and one document per group version) holding only the
///   PATCH operations of Pods and Jobs with their `fieldValidation` parameter: every API
///   server since 1.27 publishes it, and it is how kubectl learns that the server checks
///   fields itself, so that (as against a real cluster) it runs no schema of its own.
///
/// Every other path is 404; every request is recorded, so the test can show that kubectl
/// only read.
struct StandInApiServer {
    addr: std::net::SocketAddr,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandInApiServer {
    fn start() -> StandInApiServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (log, stopped) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                Self::answer(&mut conn, addr, &log);
            }
        });
        StandInApiServer {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn answer(
        conn: &mut std::net::TcpStream,
        addr: std::net::SocketAddr,
        log: &std::sync::Mutex<Vec<String>>,
    ) {
        use std::io::{Read, Write};
        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
            match conn.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head);
        let mut words = head.split_whitespace();
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        log.lock().unwrap().push(format!("{method} {target}"));
        let path = target.split('?').next().unwrap_or("");
        let (status, body) = match (method, Self::document(path, addr)) {
            ("GET", Some(doc)) => ("200 OK", doc.to_string()),
            _ => (
                "404 Not Found",
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
                    .to_string(),
            ),
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }

    fn document(path: &str, addr: std::net::SocketAddr) -> Option<serde_json::Value> {
        use serde_json::json;
        let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
        let resources = |gv: &str, name: &str, kind: &str| {
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                "resources": [{"name": name, "singularName": kind.to_lowercase(),
                    "namespaced": true, "kind": kind, "verbs": verbs}]})
        };
        // The PATCH of one object, as an API server's OpenAPI v3 describes it.
        let patchable = |object_path: &str, group: &str, kind: &str| {
            json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"},
                "paths": {object_path: {"patch": {
                    "x-kubernetes-group-version-kind": {"group": group, "version": "v1", "kind": kind},
                    "parameters": [
                        {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "OK"}}}}}})
        };
        Some(match path {
            "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}]}),
            "/api/v1" => resources("v1", "pods", "Pod"),
            "/apis" => {
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{"name": "batch",
                "versions": [{"groupVersion": "batch/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "batch/v1", "version": "v1"}}]})
            }
            "/apis/batch/v1" => resources("batch/v1", "jobs", "Job"),
            "/openapi/v3" => json!({"paths": {
                "api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=1"},
                "apis/batch/v1": {"serverRelativeURL": "/openapi/v3/apis/batch/v1?hash=1"}}}),
            "/openapi/v3/api/v1" => {
                patchable("/api/v1/namespaces/{namespace}/pods/{name}", "", "Pod")
            }
            "/openapi/v3/apis/batch/v1" => patchable(
                "/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
                "batch",
                "Job",
            ),
            _ => return None,
        })
    }

    /// A kubeconfig whose current context is this server (plain HTTP, no credentials).
    fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://{}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    namespace: sandrun-check\ncurrent-context: stand-in\nusers: []\n",
                self.addr
            ),
        )
        .unwrap();
        path
    }
}

impl Drop for StandInApiServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The check, `kubectl create --dry-run=client -o yaml -f FILE`, on every golden
/// manifest, against the stand-in API server above: kubectl parses each document,
/// checks it has an apiVersion and kind it can map (and no duplicate keys), resolves the
/// kind through discovery, learns from OpenAPI v3 that the server would check fields
/// itself, and prints the object without sending it. That is what the same command does
/// against a real cluster. It does not check field names or types (a client dry run
/// never does once the server validates fields): the next test does, through kubectl's
/// Go types.
#[test]
fn kubectl_create_client_dry_run_accepts_every_manifest() {
    if !have_kubectl() {
        return;
    }
    let server = StandInApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig(dir.path());
    for (path, ours) in golden_manifests() {
        let theirs = kubectl(
            Command::new("kubectl")
                .args(["create", "--dry-run=client", "-o", "yaml", "-f"])
                .arg(&path)
                .env("KUBECONFIG", &kubeconfig)
                .env("HOME", dir.path()), // no discovery cache from an earlier run
            &path,
        );
        let ours_docs = documents(&ours);
        let theirs_docs: Vec<&str> = theirs.split("\n---\n").collect();
        assert_eq!(ours_docs.len(), theirs_docs.len(), "{}", path.display());
        for (o, t) in ours_docs.iter().zip(theirs_docs) {
            let mut t: serde_yaml::Value = serde_yaml::from_str(t).unwrap();
            // kubectl puts an object without a namespace in the context's namespace.
            if let Some(meta) = t.get_mut("metadata").and_then(|m| m.as_mapping_mut()) {
                if meta.get("namespace").and_then(|n| n.as_str()) == Some("sandrun-check") {
                    meta.remove("namespace");
                }
            }
            let o: serde_yaml::Value = serde_yaml::from_str(o).unwrap();
            assert_eq!(normalize(o), normalize(t), "{}", path.display());
        }
    }
    let requests = server.requests.lock().unwrap().clone();
    assert!(
        requests.iter().all(|r| r.starts_with("GET ")),
        "kubectl sent more than reads: {requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /openapi/v3/api")),
        "kubectl did not ask whether the server validates fields: {requests:?}"
    );
}

/// kubectl's own Go types read every golden manifest and write it back field for field:
/// `kubectl set serviceaccount --local` needs no server, decodes the file into kubectl's
/// typed objects and encodes them again; a field kubectl does not know, or of the wrong
/// type, would be dropped or refused, so the round trip must give back the same object
/// (plus the service account it set).
#[test]
fn kubectl_go_types_read_every_manifest_back_unchanged() {
    if !have_kubectl() {
        return;
    }
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    let mut checked = 0;
    for (path, ours) in golden_manifests() {
        let theirs = kubectl(
            Command::new("kubectl")
                .args(["set", "serviceaccount", "--local", "-o", "yaml", "-f"])
                .arg(&path)
                .arg("default")
                .env("KUBECONFIG", kubeconfig.path()),
            &path,
        );
        let ours_docs = documents(&ours);
        // kubectl prints several objects as a v1 List.
        let theirs_docs: Vec<serde_yaml::Value> = if ours_docs.len() == 1 {
            vec![serde_yaml::from_str(&theirs).unwrap()]
        } else {
            let list: serde_yaml::Value = serde_yaml::from_str(&theirs).unwrap();
            list["items"].as_sequence().unwrap().clone()
        };
        assert_eq!(ours_docs.len(), theirs_docs.len(), "{}", path.display());
        for (o, t) in ours_docs.iter().zip(theirs_docs) {
            let ours = serde_yaml::to_string(&normalize(serde_yaml::from_str(o).unwrap())).unwrap();
            let theirs = serde_yaml::to_string(&normalize(t)).unwrap();
            if let Some((a, b)) = ours.lines().zip(theirs.lines()).find(|(a, b)| a != b) {
                panic!("{}: kubectl changed\n  {a}\ninto\n  {b}", path.display());
            }
            assert_eq!(ours, theirs, "{}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} manifests checked");
}

/// Drop what kubectl adds or leaves out by itself: the service account it was asked to
/// set, `creationTimestamp: null`, `status: {}`, and empty strings (Go's omitempty).
fn normalize(mut v: serde_yaml::Value) -> serde_yaml::Value {
    fn walk(v: &mut serde_yaml::Value) {
        match v {
            serde_yaml::Value::Mapping(m) => {
                for key in [
                    "serviceAccountName",
                    "serviceAccount",
                    "creationTimestamp",
                    "status",
                ] {
                    m.remove(key);
                }
                m.retain(|_, v| v.as_str() != Some(""));
                // Sorted keys, so that a difference is reported as the first line that differs.
                let mut entries: Vec<(serde_yaml::Value, serde_yaml::Value)> =
                    std::mem::take(m).into_iter().collect();
                entries.sort_by_key(|(k, _)| k.as_str().unwrap_or_default().to_string());
                for (k, mut v) in entries {
                    walk(&mut v);
                    m.insert(k, v);
                }
            }
            serde_yaml::Value::Sequence(s) => s.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

/// The Pod's containers run as processes on this machine, all started at once as the
/// kubelet starts them, with `/sandrun` in a temporary directory and the host's static
/// busybox: the wrappers alone must give Harness's order, `when`, failure strategies
/// and outputs.
#[test]
fn the_pod_runs_its_steps_in_harness_order() {
    if !Path::new("/bin/busybox").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "/bin/busybox is missing (Debian package: busybox-static)"
        );
        eprintln!("skipped: /bin/busybox missing (Debian package: busybox-static)");
        return;
    }
    let step = |id: &str, command: &str, extra: &str| {
        format!(
            "- step:\n    type: Run\n    name: {id}\n    identifier: {id}\n{extra}    spec:\n      image: alpine:3\n      shell: Sh\n      command: {command}\n"
        )
    };
    let steps = [
        step("a", "'echo a >> log; V=42'", "")
            .replace("      command:", "      outputVariables:\n        - name: V\n      command:"),
        "- parallel:\n".to_string()
            // b1 waits (boundedly) for b2's line: only running together gives b2, b1.
            + &indent(&step(
                "b1",
                "'for i in $(seq 100); do grep -q b2 log && break; sleep 0.1; done; echo b1 >> log'",
                "",
            ))
            + &indent(&step(
                "b2",
                "'echo b2 >> log; exit 1'",
                "    failureStrategies:\n      - onFailure:\n          errors: [AllErrors]\n          action:\n            type: Ignore\n",
            )),
        step(
            "c",
            "'echo \"c $V_IN\" >> log'",
            "    when:\n      stageStatus: Success\n      condition: <+steps.a.output.outputVariables.V> == \"42\"\n",
        )
        .replace(
            "      command:",
            "      envVariables:\n        V_IN: <+steps.a.output.outputVariables.V>\n      command:",
        ),
        step(
            "d",
            "'if [ -e tried ]; then echo d >> log; else touch tried; exit 1; fi'",
            "    failureStrategies:\n      - onFailure:\n          errors: [AllErrors]\n          action:\n            type: Retry\n            spec:\n              retryCount: 1\n              onRetryFailure:\n                action:\n                  type: MarkAsFailure\n",
        ),
        step("e", "'exit 3'", ""),
        step("f", "'echo f >> log'", ""),
        step("g", "'echo g >> log'", "    when:\n      stageStatus: Failure\n"),
    ]
    .concat();
    let plan = plan_stage(support::KUBERNETES, &steps);
    let text = export::kubernetes(&plan, &KubeOptions::default(), &KnownImages::new()).unwrap();
    let spec = pod_of(&text);

    let root = tempfile::tempdir().unwrap();
    let sandrun = root.path().join("sandrun");
    let workspace = root.path().join("harness");
    std::fs::create_dir_all(sandrun.join("bin")).unwrap();
    std::fs::create_dir_all(sandrun.join("state")).unwrap();
    std::fs::create_dir_all(&workspace).unwrap();
    std::os::unix::fs::symlink("/bin/busybox", sandrun.join("bin/busybox")).unwrap();
    // The kubelet's expansion (`$$` -> `$`; no `$(NAME)` of a defined variable here),
    // then the Pod's paths to this machine's.
    let here = |s: &str| {
        s.replace("$$", "$")
            .replace("/sandrun/", &format!("{}/", sandrun.display()))
    };
    let mut children: Vec<(String, std::process::Child)> = spec
        .containers
        .iter()
        .map(|c| {
            let argv: Vec<String> = c
                .command
                .as_ref()
                .unwrap()
                .iter()
                .map(|a| here(a))
                .collect();
            let child = Command::new(&argv[0])
                .args(&argv[1..])
                .current_dir(&workspace)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            (c.name.clone(), child)
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut codes = BTreeMap::new();
    while !children.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the Pod's steps did not end"
        );
        children.retain_mut(|(name, child)| match child.try_wait().unwrap() {
            Some(status) => {
                codes.insert(name.clone(), status.code().unwrap());
                false
            }
            None => true,
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(workspace.join("log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    // a; the parallel block (b1 waits for b2); c with a's output; d on its
    // retry; e fails; f is skipped (the stage failed); g runs on failure.
    assert_eq!(lines, ["a", "b2", "b1", "c 42", "d", "g"], "{log}");
    let expected: BTreeMap<String, i32> = [
        ("a", 0),
        ("b1", 0),
        ("b2", 0),
        ("c", 0),
        ("d", 0),
        ("e", 3),
        ("f", 0),
        ("g", 0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(codes, expected);
    let exit =
        |key: &str| std::fs::read_to_string(sandrun.join(format!("state/{key}.exit"))).unwrap();
    assert_eq!(exit("b2"), "1\n");
    assert_eq!(exit("f"), "skipped\n");
    assert_eq!(
        std::fs::read_to_string(sandrun.join("state/out/a/V")).unwrap(),
        "42"
    );
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[test]
fn images_the_lock_file_pins_are_named_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("ci.yaml");
    std::fs::copy(
        root().join("testdata/pipelines/docker-in-docker.yaml"),
        &pipeline,
    )
    .unwrap();
    let index = format!("sha256:{}", "a".repeat(64));
    let manifest = format!("sha256:{}", "b".repeat(64));
    std::fs::write(
        dir.path().join("ci.yaml.lock"),
        format!(
            "version: 1\nplatform: linux/amd64\nimages:\n  docker.io/library/docker:dind:\n    manifest: {manifest}\n    index: {index}\n"
        ),
    )
    .unwrap();
    let out = Command::new(support::binary())
        .args(["export", "kubernetes"])
        .arg(&pipeline)
        .env("SANDRUN_CONFIG", "/dev/null")
        .env("SANDRUN_HOME", dir.path().join("home"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = pod_of(&text);
    let dind = &spec.init_containers.as_ref().unwrap()[1];
    assert_eq!(
        dind.image.as_deref(),
        Some(format!("docker:dind@{index}").as_str())
    );
    // Not pinned: as the pipeline names it.
    assert_eq!(spec.containers[0].image.as_deref(), Some("docker:cli"));
    assert!(
        text.contains("ci.yaml.lock") && text.contains("named by digest"),
        "{text}"
    );
}

/// `testdata/pipelines/recipes/` (a pipeline whose steps use `./images/echo.yaml`, and
/// that recipe with its lock) copied to a fresh workspace, with an empty store: `run`
/// runs sandrun there, relative paths as a user types them.
struct RecipeWorkspace {
    dir: tempfile::TempDir,
}

impl RecipeWorkspace {
    fn new() -> RecipeWorkspace {
        let dir = tempfile::tempdir().unwrap();
        let src = root().join("testdata/pipelines/recipes");
        std::fs::create_dir_all(dir.path().join("ws/images")).unwrap();
        for f in ["ci.yaml", "images/echo.yaml", "images/echo.lock"] {
            std::fs::copy(src.join(f), dir.path().join("ws").join(f)).unwrap();
        }
        RecipeWorkspace { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join("ws").join(rel)
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(support::binary())
            .args(args)
            .current_dir(self.path(""))
            .env("SANDRUN_CONFIG", "/dev/null")
            .env("SANDRUN_HOME", self.dir.path().join("store"))
            .env("NO_COLOR", "1")
            .env_remove("SOURCE_DATE_EPOCH")
            .output()
            .unwrap()
    }

    /// `sandrun build images/echo.yaml`: the digest it prints.
    fn build(&self) -> String {
        let out = self.run(&["build", "images/echo.yaml"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .unwrap_or_else(|| panic!("no digest in {text}"))
            .to_string()
    }

    /// `sandrun export kubernetes ci.yaml ARGS`: its output, or its error.
    fn export(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["export", "kubernetes", "ci.yaml"];
        all.extend(args);
        let out = self.run(&all);
        match out.status.code() {
            Some(0) => Ok(String::from_utf8(out.stdout).unwrap()),
            Some(2) if out.stdout.is_empty() => {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
            code => panic!(
                "exit {code:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

/// The images of a Pod's sidecars and containers.
fn images_of(spec: &PodSpec) -> Vec<String> {
    (spec.init_containers.iter().flatten().skip(1))
        .chain(&spec.containers)
        .filter_map(|c| c.image.clone())
        .collect()
}

/// A recipe's image is named by the digest of the image `sandrun build` made from the
/// recipe and its lock (a reproducible build: the golden files hold that digest), in the
/// repository the recipe's name is mapped to, else under the store's own name, with a
/// comment saying to push it first and how.
#[test]
fn a_recipe_image_is_named_by_the_digest_of_its_build() {
    let ws = RecipeWorkspace::new();
    let digest = ws.build();
    let text = ws.export(&[]).unwrap();
    check_golden("recipes.yaml", &text);
    let spec = pod_of(&text);
    let local = format!("localhost/echo:1@{digest}");
    assert_eq!(images_of(&spec), [local.clone(), local]);
    assert!(
        text.replace("\n#   ", " ").contains("no registry has it"),
        "{text}"
    );
    // The image's own facts reach the export as a pulled image's do: its exposed port
    // becomes the sidecar's startup probe.
    let probe = spec.init_containers.as_ref().unwrap()[1]
        .startup_probe
        .as_ref()
        .unwrap();
    assert_eq!(
        probe.tcp_socket.as_ref().unwrap().port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(7000)
    );

    let mapped = ws
        .export(&["--recipe-repository", "echo=registry.example.com/ci/echo"])
        .unwrap();
    check_golden("recipes.mapped.yaml", &mapped);
    let pushed = format!("registry.example.com/ci/echo:1@{digest}");
    assert_eq!(images_of(&pod_of(&mapped)), [pushed.clone(), pushed]);
    // A repository only: the export adds the recipe's tag and the digest.
    let tagged = ws.run(&[
        "export",
        "kubernetes",
        "ci.yaml",
        "--recipe-repository",
        "echo=registry.example.com/ci/echo:1",
    ]);
    assert!(!tagged.status.success());
    let e = String::from_utf8_lossy(&tagged.stderr);
    assert!(e.contains("echo=registry.example.com/ci/echo:1: give the repository only (registry.example.com/ci/echo), without a tag or digest"), "{e}");
}

/// The digest in the manifest is the one the registry has after the push the comment
/// describes (`sandrun save`, `skopeo copy --preserve-digests`): the cluster pulls
/// exactly what was built.
#[test]
fn a_pushed_recipe_image_has_the_digest_the_export_names() {
    if !registry::tools_present() {
        return;
    }
    let server = registry::Registry::start();
    let ws = RecipeWorkspace::new();
    ws.build();
    let repository = format!("{}/ci/echo", server.addr);
    let text = ws
        .export(&["--recipe-repository", &format!("echo={repository}")])
        .unwrap();
    let image = images_of(&pod_of(&text)).remove(0);
    let archive = ws.path("echo.tar");
    let saved = ws.run(&["save", "-o", archive.to_str().unwrap(), "localhost/echo:1"]);
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    registry::run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci-archive:{}:localhost/echo:1", archive.display()),
        &format!("docker://{repository}:1"),
    ]));
    let inspected = registry::run(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{repository}:1"),
    ]));
    assert_eq!(image, format!("{repository}:1@{}", inspected.trim()));
}

/// The export never builds: a recipe whose image is not in the store as the recipe and
/// lock now say is refused, naming the command that builds it.
#[test]
fn a_recipe_not_built_as_it_now_is_is_refused_naming_the_build_command() {
    let ws = RecipeWorkspace::new();
    let e = ws.export(&[]).unwrap_err();
    assert!(e.contains("sandrun's store is empty"), "{e}");
    ws.build();
    // Changed since it was built: the image in the store is not the recipe's any more.
    let recipe = ws.path("images/echo.yaml");
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(&recipe, text.replace("built from a recipe", "changed")).unwrap();
    let e = ws.export(&[]).unwrap_err();
    assert_refused(
        e.trim_end(),
        &[
            "ci.yaml:22:17: step `echo`: image `./images/echo.yaml` is a recipe whose image is not in sandrun's store (localhost/echo:1 is not built from ",
            "and its lock as they are now)",
            "build it with `sandrun build ./images/echo.yaml`",
            "step `check`:",
        ],
    );
    // A lock that no longer fits the recipe.
    std::fs::write(&recipe, format!("{text}packages: [busybox-static]\n")).unwrap();
    let e = ws.export(&[]).unwrap_err();
    assert!(
        e.contains("images/echo.lock is stale: the recipe's packages changed"),
        "{e}"
    );
}

/// Stage flow belongs to the pipeline: the export says which Pods to apply together and
/// when a stage's `when` decides whether to apply it at all.
#[test]
fn stage_when_and_parallel_stages_are_noted() {
    let step = |id: &str| {
        format!(
            "            - step:\n                type: Run\n                name: {id}\n                identifier: {id}\n                spec:\n                  image: alpine:3\n                  shell: Sh\n                  command: echo {id}\n"
        )
    };
    let stage = |id: &str, extra: &str| {
        format!(
            "    - stage:\n        name: {id}\n        identifier: {id}\n        type: CI\n{extra}        spec:\n          infrastructure:\n            type: KubernetesDirect\n            spec:\n              connectorRef: k8s\n              namespace: ci\n          execution:\n            steps:\n{}",
            step(&format!("{id}_step"))
        )
    };
    let parallel = |s: String| {
        s.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
            .replacen("        - stage:", "      - stage:", 1)
    };
    let text = format!(
        "pipeline:\n  name: p\n  identifier: p\n  stages:\n    - parallel:\n{}{}{}",
        parallel(stage("a", "")),
        parallel(stage("b", "")),
        stage(
            "report",
            "        when:\n          pipelineStatus: Failure\n"
        )
    );
    let plan = plan_text(&text);
    let out = export::kubernetes(&plan, &KubeOptions::default(), &known_images()).unwrap();
    assert!(
        out.contains("Runs at the same time as stage(s) `b`: apply their Pods together."),
        "{out}"
    );
    assert!(
        out.contains("Harness runs this stage only after an earlier stage failed"),
        "{out}"
    );
}

/// Harness clones the codebase into the workspace; the export cannot (it has no
/// connector credentials) and says so rather than exporting an empty workspace silently.
#[test]
fn a_stage_that_clones_its_codebase_says_the_workspace_starts_empty() {
    let infra = format!("    cloneCodebase: true\n{}", support::KUBERNETES);
    let plan = plan_stage(&infra, &run_step("build", "alpine:3", ""));
    let text = export::kubernetes(&plan, &KubeOptions::default(), &KnownImages::new()).unwrap();
    assert!(
        text.replace("\n#   ", " ")
            .contains("cloneCodebase: true): Harness clones the repository into /harness"),
        "{text}"
    );
    let plan = plan_stage(support::KUBERNETES, &run_step("build", "alpine:3", ""));
    let text = export::kubernetes(&plan, &KubeOptions::default(), &KnownImages::new()).unwrap();
    assert!(!text.contains("cloneCodebase"), "{text}");
}

/// Every stage is a Pod of its own: a step that reads an earlier stage's outputs cannot
/// have them.
#[test]
fn reading_another_stages_outputs_is_refused() {
    let stage = |id: &str, steps: &str| {
        format!(
            "    - stage:\n        name: {id}\n        identifier: {id}\n        type: CI\n        spec:\n          infrastructure:\n            type: KubernetesDirect\n            spec:\n              connectorRef: k8s\n              namespace: ci\n          execution:\n            steps:\n{}",
            steps
                .lines()
                .map(|l| format!("              {l}\n"))
                .collect::<String>()
        )
    };
    let text = format!(
        "pipeline:\n  name: p\n  identifier: p\n  stages:\n{}{}",
        stage(
            "a",
            &run_step("make", "alpine:3", "      outputVariables:\n        - name: V\n")
        ),
        stage(
            "b",
            &run_step(
                "use",
                "alpine:3",
                "      envVariables:\n        V: <+pipeline.stages.a.spec.execution.steps.make.output.outputVariables.V>\n"
            )
        )
    );
    let plan = plan_text(&text);
    let m = export::kubernetes(&plan, &KubeOptions::default(), &KnownImages::new())
        .unwrap_err()
        .to_string();
    assert_refused(
        &m,
        &["stage `b`: step `use`: reads output variables of stage `a`: every stage is a Pod of its own, and outputs do not cross Pods"],
    );
}

/// A recipe based on another recipe is found through its base, as `sandrun build` finds
/// it: a change to the base is a change to the image.
#[test]
fn a_recipe_on_a_recipe_is_found_through_its_base() {
    let ws = RecipeWorkspace::new();
    std::fs::write(
        ws.path("images/top.yaml"),
        "name: top\ntag: \"2\"\nbase: ./echo.yaml\narchitecture: amd64\nfiles:\n  - {path: /etc/top, content: on top}\n",
    )
    .unwrap();
    let pipeline = std::fs::read_to_string(ws.path("ci.yaml")).unwrap();
    std::fs::write(
        ws.path("ci.yaml"),
        pipeline.replace("./images/echo.yaml", "./images/top.yaml"),
    )
    .unwrap();
    let out = ws.run(&["build", "images/top.yaml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built = String::from_utf8_lossy(&out.stdout);
    let digest = built
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap();
    let text = ws.export(&[]).unwrap();
    assert_eq!(
        images_of(&pod_of(&text))[0],
        format!("localhost/top:2@{digest}")
    );
    let base = ws.path("images/echo.yaml");
    let echo = std::fs::read_to_string(&base).unwrap();
    std::fs::write(&base, echo.replace("built from a recipe", "changed")).unwrap();
    let e = ws.export(&[]).unwrap_err();
    assert!(
        e.contains("localhost/echo:1 is not built from")
            && e.contains("sandrun build ./images/top.yaml"),
        "{e}"
    );
}
