//! `cargo xtask vm-test`: weft's fixture tier and a namespace test on other kernels, each booted
//! under QEMU.
//!
//! Every piece comes from Debian's archive through apt and is cached under `target/vm/`:
//! - the kernels: `linux-image-amd64` of the suite that carries each series (bullseye for 5.10,
//!   bookworm for 6.1, trixie for 6.12, sid for the newest), fetched with a private apt
//!   configuration (`target/vm/apt/`), so the system's sources stay untouched;
//! - QEMU and a static busybox, unpacked from their packages into `target/vm/qemu/` unless the
//!   machine has QEMU already (installing Debian's QEMU would replace a newer `qemu-utils`).
//!
//! A guest boots the Debian kernel with a small initramfs (busybox, the 9p modules, an init
//! script) that mounts the host's root read-only over 9p, gives it fresh `/proc`, `/sys`,
//! `/tmp`, `/run`, bpffs, cgroup2 and the guest kernel's own modules, and switches into it to run
//! the host-built test binaries. Results come back through a second, writable 9p share.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, ensure};

use crate::{capture, cargo, root, run};

/// What `--all` runs: the oldest supported series, the two LTS series after it, and the newest
/// kernel Debian has.
pub const ALL_KERNELS: &[&str] = &["5.10", "6.1", "6.12", NEWEST];
/// What `cargo xtask test` runs: the oldest and the newest, to stay inside CI's time.
pub const TEST_KERNELS: &[&str] = &["5.10", NEWEST];
/// The spelling of "the highest version the archive has".
pub const NEWEST: &str = "newest";

/// A module of one of the privileged crate's test binaries, run on its own in a guest.
struct GuestSuite {
    /// The test module, also the name its results and log go by.
    name: &'static str,
    /// The integration test binary (`tests/tests/<binary>/`) it is in.
    binary: &'static str,
    env: &'static [(&'static str, &'static str)],
}

/// What a guest runs, in order, with the environment each needs. The fuzzer runs a small share
/// of its frames: a guest without KVM is about 20 times slower.
const GUEST_SUITES: &[GuestSuite] = &[
    GuestSuite {
        name: "run",
        binary: "prog",
        env: &[],
    },
    GuestSuite {
        name: "run_overlay",
        binary: "prog",
        env: &[],
    },
    GuestSuite {
        name: "run_external",
        binary: "prog",
        env: &[],
    },
    GuestSuite {
        name: "fuzz",
        binary: "prog",
        env: &[("WEFT_FUZZ_FRAMES", "3000")],
    },
    GuestSuite {
        name: "kernel",
        binary: "netns",
        env: &[],
    },
];

/// How long one guest may run before it is stopped and counted as failed.
const GUEST_TIME_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The suites whose `linux-image-amd64` the matrix picks from.
const SUITES: &[(&str, bool)] = &[
    ("bullseye", false),
    ("bullseye-security", true),
    ("bookworm", false),
    ("bookworm-security", true),
    ("trixie", false),
    ("sid", false),
];

/// Package lists younger than this are not fetched again.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

fn vm_dir() -> PathBuf {
    root().join("target/vm")
}

/// Boots each of `kernels` (series such as "5.10", or [`NEWEST`]) and runs the guest tests (those
/// named in `only`, or all); fails when any kernel fails.
pub fn vm_test(kernels: &[String], only: &[String]) -> anyhow::Result<()> {
    let selected: Vec<&GuestSuite> = GUEST_SUITES
        .iter()
        .filter(|suite| only.is_empty() || only.iter().any(|o| o == suite.name))
        .collect();
    ensure!(
        selected.len() >= only.len(),
        "vm-test runs these test modules: {}",
        GUEST_SUITES
            .iter()
            .map(|suite| suite.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let qemu = Qemu::ensure(&vm_dir().join("qemu"))?;
    let archive = KernelArchive::open(&vm_dir().join("apt"))?;
    let tests = build_guest_tests(&selected)?;
    let mut outcomes = Vec::new();
    for series in kernels {
        let kernel = archive
            .fetch(series, &vm_dir().join("kernels"))
            .with_context(|| format!("fetching the {series} kernel"))?;
        println!("vm-test: booting {} ({series})", kernel.release);
        let outcome = run_guest(&qemu, &kernel, &tests)
            .with_context(|| format!("running the guest on {}", kernel.release))?;
        println!("{}", outcome.report());
        outcomes.push(outcome);
    }
    println!("\nvm-test summary ({}):", qemu.accel.describe());
    for outcome in &outcomes {
        println!("  {}", outcome.summary());
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.release.as_str())
        .collect();
    ensure!(
        failed.is_empty(),
        "vm-test failed on {}; each guest's logs are in target/vm/runs/<kernel>/out/",
        failed.join(", ")
    );
    Ok(())
}

/// Builds the test binaries of the `selected` suites (debug, as `cargo test` does).
fn build_guest_tests(selected: &[&'static GuestSuite]) -> anyhow::Result<Vec<GuestTest>> {
    // Workspace-wide, as `cargo xtask test` builds: the same features, so nothing is rebuilt.
    run(cargo().args(["build", "--workspace", "--bins", "--locked"]))?;
    let mut build = cargo();
    build.args([
        "test",
        "--workspace",
        "--no-run",
        "--locked",
        "--message-format=json",
    ]);
    let binaries: std::collections::BTreeSet<&str> =
        selected.iter().map(|suite| suite.binary).collect();
    for binary in binaries {
        build.args(["--test", binary]);
    }
    let output = build
        .stderr(Stdio::inherit())
        .output()
        .context("building the guest's tests")?;
    ensure!(output.status.success(), "building the guest's tests failed");
    let mut executables = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(executable)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) else {
            continue;
        };
        executables.insert(name.to_owned(), PathBuf::from(executable));
    }
    selected
        .iter()
        .map(|&suite| {
            let executable = executables
                .get(suite.binary)
                .with_context(|| format!("cargo did not build the {} test binary", suite.binary))?;
            Ok(GuestTest {
                suite,
                executable: executable.clone(),
            })
        })
        .collect()
}

struct GuestTest {
    suite: &'static GuestSuite,
    executable: PathBuf,
}

/// How QEMU runs guests here.
#[derive(Clone, Copy)]
enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM when the machine has a usable one, else TCG (software emulation). `WEFT_VM_ACCEL`
    /// (`kvm` or `tcg`) overrides. A `kvm_pvm` module (a paravirtualised KVM) runs only guests
    /// built for it, so it counts as none.
    fn detect() -> Self {
        match std::env::var("WEFT_VM_ACCEL").as_deref() {
            Ok("kvm") => return Self::Kvm,
            Ok("tcg") => return Self::Tcg,
            _ => {}
        }
        let usable = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
            && !Path::new("/sys/module/kvm_pvm").exists()
            && ["kvm_intel", "kvm_amd"]
                .iter()
                .any(|m| Path::new("/sys/module").join(m).exists());
        if usable { Self::Kvm } else { Self::Tcg }
    }

    fn args(self) -> [&'static str; 4] {
        match self {
            Self::Kvm => ["-accel", "kvm", "-cpu", "host"],
            // One host thread for all vCPUs: with a thread each, a guest patching its own code
            // (static keys, as 7.2 does at boot and as attaching BPF programs does) raced on the
            // other vCPU and hit the int3 of the patch once in several boots. No slower here.
            Self::Tcg => ["-accel", "tcg,thread=single", "-cpu", "max"],
        }
    }

    /// How much longer the tests' waits may take in such a guest (`WEFT_TIME_SCALE`).
    fn time_scale(self) -> u32 {
        match self {
            Self::Kvm => 1,
            Self::Tcg => 5,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Kvm => "QEMU with KVM",
            Self::Tcg => "QEMU with TCG, no KVM",
        }
    }
}

/// QEMU and busybox, from the system or unpacked from Debian's packages.
struct Qemu {
    binary: PathBuf,
    /// Where the unpacked QEMU finds its libraries and firmware (empty for the system's).
    library_path: Option<String>,
    firmware: Vec<PathBuf>,
    busybox: PathBuf,
    accel: Accel,
}

impl Qemu {
    fn ensure(dir: &Path) -> anyhow::Result<Self> {
        let unpacked = dir.join("root");
        let busybox = unpacked.join("bin/busybox");
        let system = capture("sh", &["-c", "command -v qemu-system-x86_64"]).ok();
        let mut packages = vec!["busybox-static".to_owned()];
        if system.is_none() {
            packages.extend(packages_to_run_qemu()?);
        }
        let stamp = dir.join(".unpacked");
        if fs::read_to_string(&stamp).ok().as_deref() != Some(&packages.join(" ")) {
            println!(
                "vm-test: unpacking {} into {}",
                packages.join(" "),
                dir.display()
            );
            let debs = dir.join("debs");
            remove_dir_if_present(dir)?;
            fs::create_dir_all(&debs)?;
            run(Command::new("apt-get")
                .current_dir(&debs)
                .arg("download")
                .args(&packages))?;
            for deb in fs::read_dir(&debs)? {
                run(Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(deb?.path())
                    .arg(&unpacked))?;
            }
            fs::write(&stamp, packages.join(" "))?;
        }
        let accel = Accel::detect();
        Ok(match system {
            Some(binary) => Self {
                binary: binary.into(),
                library_path: None,
                firmware: Vec::new(),
                busybox,
                accel,
            },
            None => Self {
                binary: unpacked.join("usr/bin/qemu-system-x86_64"),
                library_path: Some(format!(
                    "{}:{}",
                    unpacked.join("usr/lib/x86_64-linux-gnu").display(),
                    unpacked.join("lib/x86_64-linux-gnu").display()
                )),
                firmware: vec![
                    unpacked.join("usr/share/seabios"),
                    unpacked.join("usr/share/qemu"),
                ],
                busybox,
                accel,
            },
        })
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        if let Some(path) = &self.library_path {
            command.env("LD_LIBRARY_PATH", path);
        }
        for dir in &self.firmware {
            command.arg("-L").arg(dir);
        }
        command.args(self.accel.args());
        command
    }
}

/// The packages installing `qemu-system-x86` would add to this machine (what apt would install,
/// without installing it).
fn packages_to_run_qemu() -> anyhow::Result<Vec<String>> {
    let simulate = || {
        Command::new("apt-get")
            .args([
                "install",
                "--simulate",
                "--no-install-recommends",
                "qemu-system-x86",
            ])
            .output()
    };
    let mut output = simulate()?;
    if !output.status.success() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        output = simulate()?;
    }
    ensure!(
        output.status.success(),
        "apt cannot resolve qemu-system-x86: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.strip_prefix("Inst "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn remove_dir_if_present(dir: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Debian's archive through a private apt configuration.
struct KernelArchive {
    dir: PathBuf,
}

impl KernelArchive {
    fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let (main, security) = debian_mirrors();
        let mut sources = String::new();
        for (suite, is_security) in SUITES {
            let mirror = if *is_security { &security } else { &main };
            sources.push_str(&format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n"
            ));
        }
        fs::write(dir.join("sources.list"), sources)?;
        fs::write(dir.join("status"), "")?;
        let archive = Self {
            dir: dir.to_owned(),
        };
        archive.update()?;
        Ok(archive)
    }

    fn options(&self) -> Vec<String> {
        let dir = self.dir.display();
        [
            format!("Dir::Etc::SourceList={dir}/sources.list"),
            "Dir::Etc::SourceParts=/nonexistent".to_owned(),
            format!("Dir::State::Lists={dir}/lists"),
            format!("Dir::State::status={dir}/status"),
            format!("Dir::Cache={dir}/cache"),
            "APT::Sandbox::User=root".to_owned(),
        ]
        .into_iter()
        .flat_map(|option| ["-o".to_owned(), option])
        .collect()
    }

    /// Fetches the package lists unless they are recent; offline, old lists still do.
    fn update(&self) -> anyhow::Result<()> {
        let stamp = self.dir.join("updated");
        let age = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        if age.is_some_and(|age| age < LISTS_MAX_AGE) {
            return Ok(());
        }
        let result = run(Command::new("apt-get")
            .args(self.options())
            .args(["update", "-q"]));
        match (result, age) {
            (Ok(()), _) => fs::write(&stamp, "").map_err(Into::into),
            (Err(e), Some(_)) => {
                println!("vm-test: could not refresh Debian's package lists ({e}); using the old ones");
                Ok(())
            }
            (Err(e), None) => Err(e.context(
                "vm-test fetches its kernels from Debian's archive; this machine must reach it once",
            )),
        }
    }

    fn apt_cache(&self, args: &[&str]) -> anyhow::Result<String> {
        let options = self.options();
        let all: Vec<&str> = options
            .iter()
            .map(String::as_str)
            .chain(args.iter().copied())
            .collect();
        capture("apt-cache", &all)
    }

    /// The kernel package of `series` (the newest of that series), unpacked and ready to boot.
    fn fetch(&self, series: &str, kernels: &Path) -> anyhow::Result<Kernel> {
        let policy = self.apt_cache(&["policy", "linux-image-amd64"])?;
        let version = newest_of_series(&policy, series).with_context(|| {
            format!("Debian's archive has no linux-image-amd64 of the {series} series")
        })?;
        let image =
            dependencies(&self.apt_cache(&["depends", &format!("linux-image-amd64={version}")])?)
                .into_iter()
                .find(|p| p.starts_with("linux-image-"))
                .with_context(|| format!("linux-image-amd64 {version} names no kernel image"))?;
        let release = image["linux-image-".len()..].to_owned();
        let dir = kernels.join(&release);
        if !dir.join(".ready").exists() {
            // Since 7.x the image package is split: the kernel, its base files, its modules.
            let mut packages = vec![image.clone()];
            packages.extend(
                dependencies(&self.apt_cache(&["depends", &image])?)
                    .into_iter()
                    .filter(|p| {
                        ["linux-base-", "linux-binary-", "linux-modules-"]
                            .iter()
                            .any(|prefix| p.starts_with(prefix))
                            && p.ends_with(&release)
                    }),
            );
            println!("vm-test: fetching {}", packages.join(" "));
            remove_dir_if_present(&dir)?;
            let debs = dir.join("debs");
            fs::create_dir_all(&debs)?;
            run(Command::new("apt-get")
                .current_dir(&debs)
                .args(self.options())
                .arg("download")
                .args(&packages))?;
            let tree = dir.join("tree");
            for deb in fs::read_dir(&debs)? {
                run(Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(deb?.path())
                    .arg(&tree))?;
            }
            // Modules under /lib/modules, where bookworm's kmod and the guest look for them.
            let merged = tree.join("usr/lib/modules").join(&release);
            if merged.exists() {
                fs::create_dir_all(tree.join("lib/modules"))?;
                fs::rename(&merged, tree.join("lib/modules").join(&release))?;
            }
            run(Command::new("depmod").arg("-b").arg(&tree).arg(&release))?;
            fs::remove_dir_all(&debs)?;
            fs::write(dir.join(".ready"), &version)?;
        }
        let tree = dir.join("tree");
        let vmlinuz = [
            tree.join("boot").join(format!("vmlinuz-{release}")),
            tree.join("lib/modules").join(&release).join("vmlinuz"),
        ]
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("no vmlinuz in {}", tree.display()))?;
        Ok(Kernel {
            release,
            tree,
            vmlinuz,
        })
    }
}

/// The archive's addresses this machine uses (its own mirror or proxy), else Debian's.
fn debian_mirrors() -> (String, String) {
    let mut uris = Vec::new();
    let sources = fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .chain([PathBuf::from("/etc/apt/sources.list")]);
    for path in sources {
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if let Some(list) = line.strip_prefix("URIs:") {
                uris.extend(list.split_whitespace().map(str::to_owned));
            } else if let Some(rest) = line.strip_prefix("deb ") {
                let rest = match rest.trim_start().strip_prefix('[') {
                    Some(options) => options.split_once(']').map_or("", |(_, r)| r),
                    None => rest,
                };
                uris.extend(rest.split_whitespace().next().map(str::to_owned));
            }
        }
    }
    let find = |security: bool| {
        uris.iter()
            .map(|uri| uri.trim_end_matches('/'))
            .find(|uri| uri.ends_with("/debian-security") == security && uri.contains("debian"))
            .map(str::to_owned)
    };
    (
        find(false).unwrap_or_else(|| "http://deb.debian.org/debian".to_owned()),
        find(true).unwrap_or_else(|| "http://deb.debian.org/debian-security".to_owned()),
    )
}

/// The highest version in `apt-cache policy` output whose upstream version is of `series`
/// ("5.10" takes 5.10.x, never 5.100), or the highest of all for [`NEWEST`].
fn newest_of_series(policy: &str, series: &str) -> Option<String> {
    let table = policy.split_once("Version table:")?.1;
    // A version's line is "VERSION PRIORITY" (after " *** " for the installed one); the lines
    // under it name where it comes from.
    table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line
                .trim_start_matches(" *** ")
                .split_whitespace()
                .collect();
            match fields[..] {
                [version, priority] if priority.parse::<i32>().is_ok() => Some(version.to_owned()),
                _ => None,
            }
        })
        .filter(|version| {
            series == NEWEST || version.starts_with(&format!("{series}.")) || version == series
        })
        .max_by_key(|version| version_key(version))
}

/// Debian kernel versions ("6.12.117-1") compared by their numbers.
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// The package names after `Depends:` in `apt-cache depends` output.
fn dependencies(depends: &str) -> Vec<String> {
    depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(|name| name.trim().trim_matches(['<', '>']).to_owned())
        .collect()
}

/// An unpacked Debian kernel.
struct Kernel {
    release: String,
    /// The packages' files; modules under `lib/modules/<release>` with their `modules.dep`.
    tree: PathBuf,
    vmlinuz: PathBuf,
}

impl Kernel {
    /// The module files `module` needs, itself last, in load order; none when it is built in.
    fn module_files(&self, module: &str) -> anyhow::Result<Vec<PathBuf>> {
        let listing = capture(
            "modprobe",
            &[
                "-d",
                &self.tree.to_string_lossy(),
                "-S",
                &self.release,
                "--show-depends",
                module,
            ],
        )
        .with_context(|| format!("{} has no module {module}", self.release))?;
        Ok(listing
            .lines()
            .filter_map(|line| line.strip_prefix("insmod "))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(PathBuf::from)
            .collect())
    }
}

/// The initramfs: busybox, the modules 9p over virtio needs, and `/init`.
fn initramfs(kernel: &Kernel, busybox: &Path) -> anyhow::Result<Vec<u8>> {
    let mut archive = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "mnt", "modules", "keep"] {
        archive.directory(dir);
    }
    archive.device("dev/console", 5, 1);
    archive.file("bin/busybox", 0o755, &fs::read(busybox)?);
    archive.file("init", 0o755, INIT.as_bytes());
    let mut seen = BTreeSet::new();
    let mut order = 0;
    for module in ["virtio_pci", "9pnet_virtio", "9p"] {
        for path in kernel.module_files(module)? {
            if !seen.insert(path.clone()) {
                continue;
            }
            let name = path
                .file_name()
                .context("module file name")?
                .to_string_lossy()
                .split(".ko")
                .next()
                .unwrap_or_default()
                .to_owned();
            order += 1;
            archive.file(
                &format!("modules/{order:02}-{name}.ko"),
                0o644,
                &decompressed_module(&path)?,
            );
        }
    }
    Ok(archive.finish())
}

/// A module's object, uncompressed (busybox's insmod reads plain ELF only).
fn decompressed_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let output = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool}"))?;
    ensure!(
        output.status.success(),
        "{tool} could not decompress {}",
        path.display()
    );
    Ok(output.stdout)
}

/// The guest's first process: prepares the host's root and switches into it.
const INIT: &str = r#"#!/bin/busybox sh
# weft vm-test: mount the host's root read-only over 9p, give it what a running system has
# (its own /proc, /sys, /dev, /tmp, /run, bpffs, cgroup2), switch to it.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
for module in /modules/*.ko; do
    insmod "$module" || echo "vm-test: insmod $module failed"
done
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p"; }
out=$(arg weft.out)
project=$(arg weft.project)
nine="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o "$nine,ro,cache=loose" hostroot /mnt || { echo "vm-test: no 9p root"; poweroff -f; }
# Fresh /tmp and /run, but a project checked out under one of them (a CI clone in /tmp) stays.
for dir in /tmp /run; do
    case "$project" in
    "$dir"/*)
        mount --bind "/mnt$project" /keep
        mount -t tmpfs "${dir#/}" "/mnt$dir"
        mkdir -p "/mnt$project"
        mount --move /keep "/mnt$project"
        ;;
    *) mount -t tmpfs "${dir#/}" "/mnt$dir" ;;
    esac
done
mount -t 9p -o "$nine" out "/mnt$out"
mount -t proc proc /mnt/proc
mount -t sysfs sys /mnt/sys
mount -t devtmpfs dev /mnt/dev
mount -t tmpfs shm /mnt/dev/shm 2>/dev/null
mount -t bpf bpf /mnt/sys/fs/bpf
mount -t cgroup2 cgroup2 /mnt/sys/fs/cgroup
umount /proc /dev
exec switch_root /mnt /bin/sh "$out/guest.sh"
"#;

/// The test script the guest runs as its first process, from the host's root.
fn guest_script(out: &Path, kernel: &Kernel, accel: Accel, tests: &[GuestTest]) -> String {
    let out = out.display();
    let tree = kernel.tree.display();
    let mut script = format!(
        r#"#!/bin/sh
# Written by `cargo xtask vm-test`; runs as the guest's first process.
out={out}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp RUST_BACKTRACE=1
export WEFT_BIN={weft} WEFT_TIME_SCALE={time_scale}
echo 1 > /proc/sys/kernel/sysrq
# This kernel's modules are not in the host's /lib/modules: a modprobe that looks in its tree,
# for the kernel's own module requests (nftables, tc) and for the tests.
mkdir /tmp/vm-bin
printf '#!/bin/sh\nexec /sbin/modprobe -d {tree} "$@"\n' > /tmp/vm-bin/modprobe
chmod 755 /tmp/vm-bin/modprobe
echo /tmp/vm-bin/modprobe > /proc/sys/kernel/modprobe
export PATH=/tmp/vm-bin:$PATH
ip link set lo up
uname -r > "$out/kernel"
: > "$out/results"
failed=0
run() {{
    name=$1; shift
    start=$(date +%s%N)
    if env "$@" --test-threads=1 > "$out/$name.log" 2>&1; then result=ok; else result=FAILED; failed=1; fi
    echo "$name $result $(( ($(date +%s%N) - start) / 1000000 ))" >> "$out/results"
}}
"#,
        weft = root().join("target/debug/weft").display(),
        time_scale = accel.time_scale(),
    );
    for test in tests {
        let env: String = test
            .suite
            .env
            .iter()
            .map(|(key, value)| format!("{key}={value} "))
            .collect();
        // The module's path as the filter: its tests and no other module's.
        script.push_str(&format!(
            "run {name} {env}{} {name}::\n",
            test.executable.display(),
            name = test.suite.name,
        ));
    }
    script
        .push_str("echo $failed > \"$out/failed\"\nsync\necho o > /proc/sysrq-trigger\nsleep 60\n");
    script
}

/// What one guest reported.
struct Outcome {
    release: String,
    /// (test, passed, milliseconds)
    tests: Vec<(String, bool, u64)>,
    /// Whether the guest got to the end of its script.
    finished: bool,
    wall: Duration,
    out: PathBuf,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.finished && !self.tests.is_empty() && self.tests.iter().all(|(_, ok, _)| *ok)
    }

    fn summary(&self) -> String {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let failed: Vec<&str> = self
            .tests
            .iter()
            .filter(|(_, ok, _)| !ok)
            .map(|(name, _, _)| name.as_str())
            .collect();
        let detail = if !self.finished {
            format!(
                " (the guest did not finish; see {}/console.log)",
                self.out.display()
            )
        } else if failed.is_empty() {
            String::new()
        } else {
            format!(" (failed: {})", failed.join(", "))
        };
        format!(
            "{:<26} {verdict} in {:.0} s{detail}",
            self.release,
            self.wall.as_secs_f64()
        )
    }

    fn report(&self) -> String {
        let mut lines = vec![self.summary()];
        for (name, ok, millis) in &self.tests {
            let result = if *ok { "ok" } else { "FAILED" };
            #[expect(clippy::cast_precision_loss, reason = "milliseconds of a test run")]
            let seconds = *millis as f64 / 1000.0;
            lines.push(format!("    {name:<20} {result:<6} {seconds:>7.1} s"));
            if !ok {
                lines.push(format!("      log: {}/{name}.log", self.out.display()));
            }
        }
        lines.join("\n")
    }
}

fn run_guest(qemu: &Qemu, kernel: &Kernel, tests: &[GuestTest]) -> anyhow::Result<Outcome> {
    let run_dir = vm_dir().join("runs").join(&kernel.release);
    let out = run_dir.join("out");
    remove_dir_if_present(&run_dir)?;
    fs::create_dir_all(&out)?;
    let initramfs_path = run_dir.join("initramfs.cpio");
    fs::write(&initramfs_path, initramfs(kernel, &qemu.busybox)?)?;
    fs::write(
        out.join("guest.sh"),
        guest_script(&out, kernel, qemu.accel, tests),
    )?;
    let console = fs::File::create(out.join("console.log"))?;
    let mut command = qemu.command();
    command
        .args([
            "-smp",
            "2",
            "-m",
            "2048",
            "-nographic",
            "-vga",
            "none",
            "-nic",
            "none",
        ])
        .args(["-no-reboot", "-kernel"])
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs_path)
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=out,security_model=none",
            out.display()
        ))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet weft.out={} weft.project={}",
            out.display(),
            root().display()
        ))
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console);
    let start = Instant::now();
    let mut child = command.spawn().context("starting QEMU")?;
    let finished_in_time = loop {
        if child.try_wait()?.is_some() {
            break true;
        }
        if start.elapsed() > GUEST_TIME_LIMIT {
            child.kill()?;
            child.wait()?;
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let wall = start.elapsed();
    let results = fs::read_to_string(out.join("results")).unwrap_or_default();
    let tests = results
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?.to_owned();
            let ok = fields.next()? == "ok";
            let millis = fields.next()?.parse().ok()?;
            Some((name, ok, millis))
        })
        .collect();
    let finished = finished_in_time && out.join("failed").exists();
    let mut log = fs::OpenOptions::new()
        .append(true)
        .open(out.join("console.log"))?;
    if !finished_in_time {
        writeln!(log, "vm-test: stopped after {GUEST_TIME_LIMIT:?}")?;
    }
    Ok(Outcome {
        release: kernel.release.clone(),
        tests,
        finished,
        wall,
        out,
    })
}

/// A `newc` cpio archive, the format the kernel unpacks an initramfs from.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let name_len = u32::try_from(name.len() + 1).expect("short name");
        let data_len = u32::try_from(data.len()).expect("initramfs files are under 4 GiB");
        let fields = [
            self.inode, mode, 0, 0, 1, 0, data_len, 0, 0, rdev.0, rdev.1, name_len, 0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn directory(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, (0, 0), data);
    }

    fn device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "linux-image-amd64:
  Installed: (none)
  Candidate: 7.2.13-1
  Version table:
     7.2.13-1 500
        500 http://deb.debian.org/debian sid/main amd64 Packages
     6.12.117-1 500
        500 http://deb.debian.org/debian trixie/main amd64 Packages
     6.1.192-2 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
 *** 6.1.176-1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
     5.10.262-1 500
        500 http://deb.debian.org/debian-security bullseye-security/main amd64 Packages
     5.10.223-1 500
";

    #[test]
    fn a_series_picks_its_newest_version() {
        assert_eq!(
            newest_of_series(POLICY, "5.10").as_deref(),
            Some("5.10.262-1")
        );
        assert_eq!(
            newest_of_series(POLICY, "6.1").as_deref(),
            Some("6.1.192-2")
        );
        assert_eq!(
            newest_of_series(POLICY, "6.12").as_deref(),
            Some("6.12.117-1")
        );
        assert_eq!(
            newest_of_series(POLICY, NEWEST).as_deref(),
            Some("7.2.13-1")
        );
        assert_eq!(newest_of_series(POLICY, "7").as_deref(), Some("7.2.13-1"));
        assert_eq!(newest_of_series(POLICY, "5.1"), None);
        assert_eq!(newest_of_series(POLICY, "4.19"), None);
    }

    #[test]
    fn dependencies_are_read_from_apt_cache_depends() {
        let depends = "linux-image-amd64\n  Depends: linux-base-amd64\n  Depends: linux-image-7.2.13+deb14-amd64\n  Depends: <linux-initramfs-tool>\n";
        assert_eq!(
            dependencies(depends),
            [
                "linux-base-amd64",
                "linux-image-7.2.13+deb14-amd64",
                "linux-initramfs-tool"
            ]
        );
    }

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut cpio = Cpio::default();
        cpio.directory("bin");
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = cpio.finish();
        assert!(bytes.len().is_multiple_of(4));
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        // The file: inode 2, mode 0100755, root's, one link, size 10, name length 5 ("init"
        // and its NUL), its name padded to 4 bytes after the 110-byte header, then its data.
        let fields = [2, 0o100_755, 0, 0, 1, 0, 10, 0, 0, 0, 0, 5, 0];
        let header: String = fields.iter().map(|f| format!("{f:08x}")).collect();
        assert!(
            text.contains(&format!("070701{header}init\0\0#!/bin/sh\n\0\0")),
            "{text:?}"
        );
        assert!(text.contains("TRAILER!!!"));
    }
}
