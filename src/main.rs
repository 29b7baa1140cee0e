//! The `edgekeeper` command line: parses arguments with argh, calls into the
//! library, and turns outcomes into exit codes (0 ok, 1 runtime failure,
//! 2 usage, 3 no running daemon, 78 configuration error).

use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;

use edgekeeper::config::{self, Config};
use edgekeeper::daemon::{Daemon, RunError};
use edgekeeper::report::log as sink;
use edgekeeper::report::status::{self, Shown};
use edgekeeper::services;
use edgekeeper::sys::clock::WallTime;
use edgekeeper::sys::notify::Notifier;

const EX_USAGE: u8 = 2;
const EX_NOT_RUNNING: u8 = 3;
const EX_CONFIG: u8 = 78;

#[derive(FromArgs)]
/// Keeps an edge device in order: relocates logs, watches camera frames,
/// governs processes in cgroups and maintains storage, in one small daemon.
struct Cli {
    /// config file (default: $EDGEKEEPER_CONFIG, else /etc/edgekeeper/edgekeeper.json)
    #[argh(option)]
    config: Option<PathBuf>,

    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Run(RunCmd),
    Check(CheckCmd),
    Status(StatusCmd),
    Sweep(SweepCmd),
    Emergency(EmergencyCmd),
    Storage(StorageCmd),
    Demo(DemoCmd),
    Version(VersionCmd),
}

#[derive(FromArgs)]
/// Run the daemon in the foreground (systemd Type=notify).
#[argh(subcommand, name = "run")]
struct RunCmd {}

#[derive(FromArgs)]
/// Validate the config and print it with every default filled in.
#[argh(subcommand, name = "check")]
struct CheckCmd {
    /// print instead the directories the config writes to, one per line
    /// (for the systemd sandbox's ReadWritePaths=)
    #[argh(switch)]
    write_paths: bool,
}

#[derive(FromArgs)]
/// Print the running daemon's status snapshot (exit 3 if none is running).
#[argh(subcommand, name = "status")]
struct StatusCmd {
    /// print the raw JSON snapshot
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// One full pass of relocate sweeps, storage retention and orphan cleanup
/// now, then exit; prints what it moved or deleted.
#[argh(subcommand, name = "sweep")]
struct SweepCmd {
    /// only this service: relocate or storage
    #[argh(option)]
    only: Option<String>,
    /// print what would be done, change nothing
    #[argh(switch)]
    dry_run: bool,
}

#[derive(FromArgs)]
/// The emergency cleanup pass now, whatever at_used says: on each watched
/// mount above until_used, delete the oldest entries of its retention
/// rules, lowest priority first, keeping each rule's emergency_keep newest.
#[argh(subcommand, name = "emergency")]
struct EmergencyCmd {
    /// print what would be deleted, change nothing
    #[argh(switch)]
    dry_run: bool,
}

#[derive(FromArgs)]
/// Storage analysis: each watched mount (device, SD card or not, size, used,
/// free) and each retention rule (entries, bytes, expired, oldest, newest).
#[argh(subcommand, name = "storage")]
struct StorageCmd {}

#[derive(FromArgs)]
/// Make a sandbox, run the daemon on it while generating real work for every
/// service, and print what happened. Needs no root.
#[argh(subcommand, name = "demo")]
struct DemoCmd {
    /// how long to generate work (default 10)
    #[argh(option, default = "10")]
    seconds: u64,
    /// the sandbox directory (default ./edgekeeper-demo)
    #[argh(option, default = "PathBuf::from(\"edgekeeper-demo\")")]
    dir: PathBuf,
}

#[derive(FromArgs)]
/// Print the version, target and the services this build provides.
#[argh(subcommand, name = "version")]
struct VersionCmd {}

fn config_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .or_else(|| std::env::var_os(config::PATH_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
}

fn parse_args() -> Result<Cli, ExitCode> {
    let args: Vec<String> = match std::env::args_os().map(|a| a.into_string()).collect() {
        Ok(a) => a,
        Err(bad) => {
            eprintln!("edgekeeper: argument is not valid UTF-8: {bad:?}");
            return Err(ExitCode::from(EX_USAGE));
        }
    };
    let name = args
        .first()
        .map_or("edgekeeper", |a| a.rsplit('/').next().unwrap_or(a));
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    Cli::from_args(&[name], &rest).map_err(|exit| match exit.status {
        Ok(()) => {
            println!("{}", exit.output);
            ExitCode::SUCCESS
        }
        Err(()) => {
            eprintln!("{}", exit.output);
            ExitCode::from(EX_USAGE)
        }
    })
}

fn main() -> ExitCode {
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let path = config_path(&cli);
    match cli.command {
        Command::Run(_) => run(&path),
        Command::Check(cmd) => check(&path, cmd.write_paths),
        Command::Status(cmd) => show_status(&path, cmd.json),
        Command::Sweep(cmd) => sweep(&path, cmd.only.as_deref(), cmd.dry_run),
        Command::Emergency(cmd) => storage_command(&path, |s, out| {
            let totals = s.emergency_once(cmd.dry_run, out)?;
            Ok(totals.failed == 0)
        }),
        Command::Storage(_) => storage_command(&path, |s, out| s.analyse(out).map(|()| true)),
        Command::Demo(cmd) => {
            match edgekeeper::demo::run(&cmd.dir, cmd.seconds, &mut std::io::stdout()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("edgekeeper demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Version(_) => {
            println!("edgekeeper {}", env!("CARGO_PKG_VERSION"));
            println!("target: {}", env!("EDGEKEEPER_TARGET"));
            let provided = if services::PROVIDED.is_empty() {
                "none yet (core only)".to_string()
            } else {
                services::PROVIDED.join(" ")
            };
            println!("services: {provided}");
            println!(
                "build: {}",
                if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                }
            );
            ExitCode::SUCCESS
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("edgekeeper: {e}");
        ExitCode::from(EX_CONFIG)
    })
}

fn check(path: &std::path::Path, write_paths: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if write_paths {
        for p in config.write_paths() {
            println!("{}", p.display());
        }
        return ExitCode::SUCCESS;
    }
    println!("{}", config.to_pretty_json());
    if let Some(g) = &config.govern {
        for note in services::govern::host_notes(g) {
            eprintln!("note: govern: {note}");
        }
    }
    for name in config.services() {
        if !services::PROVIDED.contains(&name) {
            eprintln!("note: {name} is configured, but this build does not provide it yet");
        }
    }
    eprintln!("{}: ok", path.display());
    ExitCode::SUCCESS
}

fn show_status(path: &std::path::Path, json: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match status::show(&config.run_dir, json, WallTime::now()) {
        Shown::Running(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Shown::NotRunning(why) => {
            eprintln!("edgekeeper: {why}");
            ExitCode::from(EX_NOT_RUNNING)
        }
    }
}

/// The services `sweep` runs.
const SWEEPING: [&str; 2] = ["relocate", "storage"];

fn sweep(path: &std::path::Path, only: Option<&str>, dry_run: bool) -> ExitCode {
    if let Some(name) = only {
        if !SWEEPING.contains(&name) {
            eprintln!("edgekeeper: --only takes relocate or storage, not {name:?}");
            return ExitCode::from(EX_USAGE);
        }
    }
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    sink::init_stderr(log::LevelFilter::Warn);
    let built = services::build(&config);
    let wanted = |name: &str| SWEEPING.contains(&name) && only.is_none_or(|o| o == name);
    for name in built.not_built.iter().filter(|n| wanted(n)) {
        eprintln!("edgekeeper: {name} is configured, but this build does not provide it yet");
    }
    if let Some(name) = only {
        if !config.services().contains(&name) {
            eprintln!("edgekeeper: {name} is not configured in {}", path.display());
            return ExitCode::from(EX_CONFIG);
        }
    }
    // One line per file moved or deleted: buffered, not a write(2) each
    // (a retention pass may delete a hundred thousand files).
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let mut failed = 0;
    for mut svc in built.services.into_iter().filter(|s| wanted(s.name())) {
        let result = svc.sweep(dry_run, &mut out);
        if let Err(e) = std::io::Write::flush(&mut out) {
            eprintln!("edgekeeper: writing to stdout: {e}");
            failed += 1;
        }
        match result {
            Ok(totals) => {
                let verb = if dry_run { "would act on" } else { "acted on" };
                eprintln!(
                    "{}: {verb} {} file(s), {} failed",
                    svc.name(),
                    totals.acted,
                    totals.failed
                );
                failed += totals.failed;
            }
            Err(e) => {
                eprintln!("edgekeeper: {}: {e}", svc.name());
                failed += 1;
            }
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `emergency` and `storage`: the storage service's one-shot commands.
fn storage_command(
    path: &std::path::Path,
    f: impl FnOnce(&mut services::storage::Storage, &mut dyn std::io::Write) -> std::io::Result<bool>,
) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(storage) = &config.storage else {
        eprintln!(
            "edgekeeper: storage is not configured in {}",
            path.display()
        );
        return ExitCode::from(EX_CONFIG);
    };
    sink::init_stderr(log::LevelFilter::Warn);
    let mut svc = services::storage::Storage::new(storage);
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let result = f(&mut svc, &mut out).and_then(|ok| std::io::Write::flush(&mut out).map(|()| ok));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("edgekeeper: storage: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    sink::init_stderr(log::LevelFilter::Info);
    let notifier = match Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            log::warn!("NOTIFY_SOCKET unusable ({e}); not notifying systemd");
            Notifier::none()
        }
    };
    let outcome = Daemon::start(path, notifier).and_then(Daemon::run);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Config(e)) => {
            log::error!("{e}");
            ExitCode::from(EX_CONFIG)
        }
        Err(e) => {
            log::error!("{e}");
            sink::flush();
            ExitCode::FAILURE
        }
    }
}
