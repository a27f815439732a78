//! Command-line options, parsed in one place and handed down as plain structs.
//!
//! Exit codes: 0 when every step that counts succeeded, 1 when a stage failed, 2 for a
//! problem with the input (file, options) before anything ran, 130 when interrupted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::pipeline::{self, PipelineFile};
use crate::plan::{self, NetworkMode, Plan, PlanInputs};
use crate::run::events::StageResult;
use crate::run::executor::RunOptions;
use crate::run::startup::{RunRequest, Startup};
use crate::ui::{ColorChoice, JsonReporter, JunitWriter, Reporter, TerminalReporter};

pub mod recipe;
pub mod store;

const LONG_ABOUT: &str = "\
sandrun runs a Harness CI stage on this machine, as you, with no daemon.

It reads Harness CI v0 pipeline YAML unchanged (a whole `pipeline:` or a single
`stage:`): Run, Background and Plugin steps, step groups, parallel blocks, stage
variables and <+...> expressions, looping strategies (matrix, parallelism, repeat:
each instance a step or stage of its own) and stage, step-group and step templates
(template files under .harness/, beside the pipeline, or in --templates DIR). Background steps start services that later steps
call by step identifier; the stage proceeds at once and the services are stopped
when it ends. Steps with an image run in their own rootless container; steps
without one run the host's own binaries. Every stage gets a private network.

Images come from registries into a content-addressed store ($SANDRUN_HOME); a lock
file (`sandrun lock`) pins them, and `save`/`load` carry them to air-gapped hosts,
where `sandrun run --locked --offline` never opens a connection.

Typical use:
  sandrun plan .harness/ci.yaml        show what would run, in order
  sandrun run .harness/ci.yaml         run it; exit code 0 only if every step passed
  sandrun run --set tag=v1 --secret db_password=hunter2 --report-dir out/";

/// What `sandrun run --help` says about confinement (docs/security.md says more).
const CONFINEMENT: &str = "\
What a step may do (docs/security.md):
  A container step that is not `privileged: true` runs as podman and docker run one:
  the default capability set, no_new_privs (setuid binaries gain nothing), the
  container engines' default seccomp profile (no mount, no new namespaces, no kernel
  modules, keyrings, BPF or perf; other calls fail with EPERM), /proc and /sys
  read-only or masked where they reach the host, and, as root, the default device
  allow-list (null, zero, full, random, urandom, tty, console, ptmx, pts, tun: it may
  make other device nodes but not open them). Rootless, it also runs in your user
  namespace: its root is you, and the kernel refuses device nodes outright.
  `privileged: true` lifts all of it: every capability the runner has, no seccomp
  filter, no no_new_privs, the host's devices (as root, every device).
  A step without an image runs your own binaries on the host, as you (or as root
  when sandrun runs as root), without a seccomp profile; it sees the host read-only
  but for the workspace, /tmp, /var/tmp, /dev/shm, sharedPaths and --host-writable
  paths. Host steps share one network, as on a build VM: localhost:PORT reaches a
  service another host step started, localhost:HOST_PORT a container's portBindings;
  what a host step leaves running lives until the stage ends, then is stopped.
  sandrun reads a step's output variables and JUnit reports inside its control
  directory and the workspace, never following a symlink out of them, and bounded
  (128 KiB per output variable, 64 MiB per report).";

#[derive(Parser, Debug)]
#[command(name = "sandrun", version, about = "Run a Harness CI stage locally: rootless, no daemon", long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOptions,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalOptions {
    /// When to use colour and spinners: auto (a terminal without NO_COLOR), always, never.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// `--offline`, `--insecure-registry`: for every command that may touch a registry.
    #[command(flatten)]
    pub registry: store::RegistryArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a pipeline's CI stages (or one with --stage).
    #[command(after_long_help = CONFINEMENT)]
    Run(RunArgs),
    /// Print the resolved plan: order, groups, parallel blocks, hostnames, images, env.
    Plan(PlanArgs),
    /// Check a pipeline file: syntax, fields, expressions, and steps sandrun cannot run.
    Validate(ValidateArgs),
    /// Fetch images into the store (by reference, or every image a pipeline names).
    Pull(store::PullArgs),
    /// List the images in the store.
    Images(store::ImagesArgs),
    /// Remove blobs and layers that no image or lock file references.
    Gc(store::GcArgs),
    /// Verify every blob and layer in the store.
    Fsck(store::FsckArgs),
    /// Pin every image a pipeline names in a lock file beside it (`FILE.lock`), or every
    /// package of an image recipe (`images/NAME.yaml` -> `images/NAME.lock`).
    Lock(store::LockArgs),
    /// Build image recipes (`images/NAME.yaml`) into the store, reproducibly.
    Build(recipe::BuildArgs),
    /// Write images (of a pipeline, or by reference) to an OCI archive.
    Save(store::SaveArgs),
    /// Import images from an OCI archive.
    Load(store::LoadArgs),
    /// Print a stage for another engine to run (`export kubernetes`: a Pod or Job).
    Export(crate::export::command::ExportArgs),
}

/// What a pipeline needs to be planned.
#[derive(Args, Debug, Clone)]
pub struct InputArgs {
    /// The pipeline file. Default: the only YAML file under `.harness/`.
    pub file: Option<PathBuf>,
    /// Run only this stage (its identifier).
    #[arg(long, value_name = "ID")]
    pub stage: Option<String>,
    /// The workspace shared by every step (the codebase). Default: the current directory.
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Also look for Harness template files (`template: {identifier, versionLabel, type,
    /// spec}`) in DIR and below. They are always looked for beside the pipeline file and
    /// under the workspace's `.harness/`. Repeatable.
    #[arg(long = "templates", value_name = "DIR")]
    pub templates: Vec<PathBuf>,
    /// Answer an input: a variable's name or STEP.FIELD for a runtime input (`<+input>`);
    /// for what only Harness's server knows, the expression's path:
    /// `--set trigger.branch=main`, `--set variable.org.region=eu`,
    /// `--set STAGE.variables.X=...` for a stage that is not in this pipeline.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_pair)]
    pub set: Vec<(String, String)>,
    /// Read answers from a YAML file of `KEY: VALUE` (nested maps join keys with `.`:
    /// `trigger: {branch: main}`), or a Harness input set (its pipeline variables).
    /// `--set` overrides it.
    #[arg(long, value_name = "FILE")]
    pub values: Option<PathBuf>,
    /// Give a secret's value (`<+secrets.getValue("ID")>`, Secret variables). Never printed.
    #[arg(long = "secret", value_name = "ID=VALUE", value_parser = parse_pair)]
    pub secret: Vec<(String, String)>,
    /// Read secrets from a file of ID=VALUE lines (# starts a comment).
    #[arg(long, value_name = "FILE")]
    pub secrets_file: Option<PathBuf>,
    /// Network: `bridge` (each step its own address, services called by step
    /// identifier) or `pod` (all steps share one localhost, as on Kubernetes) overrides
    /// what the stage's infrastructure implies; `egress` lets steps connect out of the
    /// machine (off by default: a run is hermetic). Repeat or comma-separate: `pod,egress`.
    /// Host connections to `portBindings` are handed to the service's own `accept`
    /// (a plain loopback connection); SANDRUN_PORT_HANDOFF=off proxies them instead.
    #[arg(long, value_enum, value_name = "MODE", value_delimiter = ',')]
    pub network: Vec<NetworkArg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkArg {
    Bridge,
    Pod,
    Egress,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Skip steps only Harness's cloud can run (BuildAndPush*, caches, uploads...)
    /// instead of refusing the pipeline; each is marked skipped in the summary.
    #[arg(long)]
    pub skip_unsupported: bool,
    /// Steps without an image see the host read-only but for the workspace, /tmp,
    /// /var/tmp and /dev/shm; this lets them write PATH too (e.g. a cache such as
    /// ~/.cargo or ~/.npm). Repeatable.
    #[arg(long, value_name = "PATH")]
    pub host_writable: Vec<PathBuf>,
    /// Merge every JUnit report the steps produce into DIR/junit.xml. DIR is created
    /// and checked to be writable before any step starts.
    #[arg(long, value_name = "DIR")]
    pub report_dir: Option<PathBuf>,
    /// Print one JSON event per line instead of the terminal display.
    #[arg(long)]
    pub json: bool,
    /// How long a Background step's ports may take to accept connections.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// Refuse any image the lock file beside the pipeline does not pin (`sandrun lock`).
    #[arg(long)]
    pub locked: bool,
    /// Time between SIGTERM and SIGKILL when a step is stopped.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Print the plan as JSON (secrets masked).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// The pipeline file. Default: the only YAML file under `.harness/`.
    pub file: Option<PathBuf>,
    /// Also look for Harness template files in DIR and below (see `run --help`).
    #[arg(long = "templates", value_name = "DIR")]
    pub templates: Vec<PathBuf>,
}

pub(crate) fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got `{s}`")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    pipeline::values::parse_duration(s)
}

/// The process entry point; returns the exit code.
pub fn main() -> i32 {
    // Hidden helper subcommands run first: they must stay single-threaded.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = crate::sandbox::helper::dispatch(&args) {
        return code;
    }
    let cli = Cli::parse();
    crate::sandbox::helper::debug_logging();
    if !matches!(cli.command, Command::Run(_)) {
        crate::sandbox::state::sweep_before_command();
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sandrun: {}", masked(&format!("{e:#}")));
            2
        }
    }
}

/// The secrets of the plan being run, once it is known: an error message may quote
/// a value (a command line, a reference) that holds one.
static SECRETS: std::sync::OnceLock<crate::plan::Secrets> = std::sync::OnceLock::new();

/// `text` with the run's secrets masked, for what is printed outside the event stream.
fn masked(text: &str) -> String {
    match SECRETS.get() {
        Some(secrets) => secrets.mask(text),
        None => text.to_string(),
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Validate(args) => validate(&args),
        Command::Pull(a) => store::pull(&a, &cli.global.registry),
        Command::Images(a) => store::images(&a),
        Command::Gc(a) => store::gc(&a),
        Command::Fsck(a) => store::fsck(&a),
        Command::Lock(a) if crate::recipe::is_recipe_file(&a.pipeline) => {
            recipe::lock(&a.pipeline, &cli.global.registry)
        }
        Command::Lock(a) => store::lock(&a, &cli.global.registry),
        Command::Build(a) => recipe::build(&a, &cli.global.registry),
        Command::Save(a) => store::save(&a, &cli.global.registry),
        Command::Load(a) => store::load(&a),
        Command::Plan(args) => {
            let (_, mut plan) = load_and_plan(&args.input, false, Numbering::Peek)?;
            crate::run::images::resolve_sources(&mut plan, &cli.global.registry.pull_options()?)?;
            if args.json {
                let text = serde_json::to_string_pretty(&plan)?;
                println!("{}", plan.secrets.mask(&text));
            } else {
                print!("{}", plan::render(&plan));
            }
            Ok(0)
        }
        Command::Run(args) => run(&cli.global, &args),
        Command::Export(args) => export(&cli.global, &args),
    }
}

/// The pipeline file to use: the one given, or the only one under `.harness/`.
fn pipeline_path(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let dir = Path::new(".harness");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                        && !pipeline::is_template_file(p)
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "no pipeline file given and none found under .harness/ (give one: sandrun run FILE)"
        ),
        _ => {
            let list: Vec<String> = found.iter().map(|p| format!("  {}", p.display())).collect();
            bail!(
                "several pipelines under .harness/; name the one to use:\n{}",
                list.join("\n")
            )
        }
    }
}

/// Whether planning takes the pipeline's next build number (`run`) or only reads it
/// (`plan`, `validate`, `export`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Numbering {
    Peek,
    Take,
}

/// The build number of this run of `file`'s pipeline (a stage file is numbered by its
/// file name). Without a home directory nothing can be kept: reading says 1, taking
/// fails.
fn build_number(file: &PipelineFile, numbering: Numbering) -> anyhow::Result<u64> {
    let key = match &file.pipeline {
        Some(p) => p.identifier.clone(),
        None => file
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let Some(home) = crate::store::default_home() else {
        if numbering == Numbering::Take {
            bail!("no directory to keep build numbers in: set SANDRUN_HOME (or HOME)");
        }
        return Ok(1);
    };
    let path = crate::run::sequence::file_for(&home, &key);
    Ok(match numbering {
        Numbering::Peek => crate::run::sequence::peek(&path)?,
        Numbering::Take => crate::run::sequence::take(&path)?,
    })
}

fn load_and_plan(
    input: &InputArgs,
    placeholders: bool,
    numbering: Numbering,
) -> anyhow::Result<(PipelineFile, Plan)> {
    let path = pipeline_path(input.file.as_deref())?;
    let workspace = match &input.workspace {
        Some(w) => w.clone(),
        None => std::env::current_dir().context("cannot read the current directory")?,
    };
    let workspace = workspace
        .canonicalize()
        .with_context(|| format!("workspace {}", workspace.display()))?;
    let templates = pipeline::TemplateSearch::for_pipeline(&path, &workspace, &input.templates);
    let mut answers = match &input.values {
        Some(f) => pipeline::load_values(f).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => BTreeMap::new(),
    };
    answers.extend(input.set.iter().cloned());
    // Looping strategies written as expressions are expanded while the file is read.
    let known = pipeline::Answers {
        values: answers.clone(),
    };
    let file =
        pipeline::load_with(&path, &templates, &known).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut secrets: BTreeMap<String, String> = BTreeMap::new();
    if let Some(f) = &input.secrets_file {
        secrets.extend(read_secrets_file(f)?);
    }
    secrets.extend(input.secret.iter().cloned());
    let inputs = PlanInputs {
        workspace,
        inputs: answers,
        secrets,
        stage: input.stage.clone(),
        network: input.network.iter().rev().find_map(|n| match n {
            NetworkArg::Bridge => Some(NetworkMode::Bridge),
            NetworkArg::Pod => Some(NetworkMode::Pod),
            NetworkArg::Egress => None,
        }),
        egress: input.network.contains(&NetworkArg::Egress),
        placeholders,
        run: plan::RunIds::new(build_number(&file, numbering)?),
    };
    let plan = plan::build(&file, &inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((file, plan))
}

fn read_secrets_file(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = crate::input::read_text(path, "secrets file", crate::input::MAX_SMALL_FILE_BYTES)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                out.push((k.trim().to_string(), v.to_string()));
            }
            _ => bail!(
                "{}:{}: expected ID=VALUE (the value is not shown)",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(out)
}

fn validate(args: &ValidateArgs) -> anyhow::Result<i32> {
    let input = InputArgs {
        file: args.file.clone(),
        stage: None,
        workspace: None,
        templates: args.templates.clone(),
        set: Vec::new(),
        values: None,
        secret: Vec::new(),
        secrets_file: None,
        network: Vec::new(),
    };
    let (file, plan) = load_and_plan(&input, true, Numbering::Peek)?;
    let unsupported = unsupported_steps(&plan);
    if unsupported.is_empty() {
        println!("{}: valid", plan.source.display());
        print_server_inputs(&file);
        return Ok(0);
    }
    print_server_inputs(&file);
    for line in &unsupported {
        eprintln!("{line}");
    }
    eprintln!(
        "{}: {} step(s) cannot run locally (`sandrun run --skip-unsupported` skips them)",
        plan.source.display(),
        unsupported.len()
    );
    Ok(1)
}

/// The values only Harness's server knows that the pipeline reads, and the inputs its
/// looping strategies need: a run needs them answered.
fn print_server_inputs(file: &PipelineFile) {
    if !file.server_inputs.is_empty() {
        println!(
            "inputs only Harness's server knows; give them to `sandrun run` with --set KEY=VALUE or --values FILE:"
        );
        for i in &file.server_inputs {
            println!("  {}: {}", i.loc, i.key);
        }
    }
    if !file.unanswered.is_empty() {
        println!("inputs looping strategies need (one instance stands in for each here):");
        let mut listed: Vec<String> = Vec::new();
        for u in &file.unanswered {
            // The instances of a looped stage each name the same input.
            let line = format!("  {}: {}", u.loc, u.message);
            if !listed.contains(&line) {
                println!("{line}");
                listed.push(line);
            }
        }
    }
}

fn unsupported_steps(plan: &Plan) -> Vec<String> {
    plan.stages
        .iter()
        .flat_map(|s| s.steps())
        .filter_map(|s| {
            s.unsupported
                .as_ref()
                .map(|why| format!("{}: step `{}`: {why}", s.loc, s.key))
        })
        .collect()
}

/// `sandrun export`: plan as `run` would, with markers for secret values (they are never
/// written into manifests), then hand the plan to `export`.
fn export(
    global: &GlobalOptions,
    args: &crate::export::command::ExportArgs,
) -> anyhow::Result<i32> {
    let crate::export::command::ExportTarget::Kubernetes(k) = &args.target;
    let path = pipeline_path(k.file.as_deref())?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let input = InputArgs {
        file: Some(path),
        stage: k.stage.clone(),
        workspace: None,
        set: k.set.clone(),
        values: k.values.clone(),
        secret: crate::export::secret_markers(&text).into_iter().collect(),
        secrets_file: None,
        network: Vec::new(),
        templates: k.templates.clone(),
    };
    let (_, mut plan) = load_and_plan(&input, true, Numbering::Peek)?;
    let pull = global.registry.pull_options()?;
    crate::run::images::resolve_sources(&mut plan, &pull)?;
    let (images, recipes) = crate::export::command::from_store(&plan, &pull);
    print!(
        "{}",
        crate::export::kubernetes(&plan, &k.options(&plan, recipes)?, &images)?
    );
    Ok(0)
}

fn run(global: &GlobalOptions, args: &RunArgs) -> anyhow::Result<i32> {
    // First, before the pipeline is read: rootless, this forks the children that will
    // write the id maps while the process is small and single-threaded.
    let startup = Startup::begin()?;
    let (_, mut plan) = load_and_plan(&args.input, false, Numbering::Take)?;
    if let Some(dir) = &args.report_dir {
        JunitWriter::check_dir(dir)?;
    }
    let _ = SECRETS.set(plan.secrets.clone());
    let mut pull = global.registry.pull_options()?;
    crate::run::images::resolve_sources(&mut plan, &pull)?;
    pull.locked = args.locked;
    crate::run::images::apply_lock(&plan.source, &plan, &mut pull)?;
    let unsupported = unsupported_steps(&plan);
    if !unsupported.is_empty() && !args.skip_unsupported {
        bail!(
            "{}\nthese steps cannot run locally; nothing was started (use --skip-unsupported to run the rest)",
            unsupported.join("\n")
        );
    }
    let mut reporters: Vec<Box<dyn Reporter>> = Vec::new();
    if args.json {
        reporters.push(Box::new(JsonReporter::new(std::io::stdout())));
    } else {
        reporters.push(Box::new(TerminalReporter::new(global.color)));
    }
    if let Some(dir) = &args.report_dir {
        reporters.push(Box::new(JunitWriter::new(dir.clone())));
    }
    let finished = startup.run(RunRequest {
        plan: &plan,
        pull,
        options: RunOptions {
            grace: args.grace,
            ready_timeout: args.ready_timeout,
            skip_unsupported: args.skip_unsupported,
        },
        host_writable: args.host_writable.clone(),
        reporters,
        pull_progress: !args.json,
    })?;
    let reported = match finished.display {
        Ok(()) => true,
        Err(e) => {
            eprintln!("sandrun: {}", masked(&format!("{e:#}")));
            false
        }
    };
    Ok(match finished.result {
        // A report that could not be written (`--report-dir`) fails a passing run.
        StageResult::Succeeded | StageResult::Skipped if !reported => 1,
        StageResult::Succeeded | StageResult::Skipped => 0,
        StageResult::Failed => 1,
        StageResult::Cancelled => 130,
    })
}
