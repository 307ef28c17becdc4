//! Compiles every `cuda/<family>.cu` into a fatbin (SASS for each target architecture plus
//! PTX for the newest one) and writes `$OUT_DIR/kernels.rs`, which embeds the images with
//! `include_bytes!`. Without `nvcc` the build still succeeds: every image is `None` and the
//! runtime reports `Error::KernelsNotBuilt`. `NTKV_REQUIRE_KERNELS=1` makes that a build error.
//!
//! Environment:
//! - `NVCC`: the compiler to use; otherwise `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, the
//!   project's `.cuda-toolchain/` (from `tools/install-cuda.sh`), then `nvcc` on `PATH`.
//! - `NTKV_CUDA_ARCHS`: comma-separated compute capabilities, default `80,90`. SASS is
//!   emitted for each, PTX for the last.
//! - `NTKV_NVCC_FLAGS`: extra flags, split on whitespace.
//! - `NTKV_REQUIRE_KERNELS=1`: fail the build when nvcc is missing.
//! - `NTKV_KERNEL_CACHE`: a folder of compiled images keyed by the hash of source, headers,
//!   compiler and flags; default `<target dir>/ntkv-kernels`. Every profile (dev, release,
//!   clippy's check) and every checkout that shares it reuses an image instead of running
//!   nvcc again, since a full build of every family takes minutes.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "NTKV_CUDA_ARCHS",
    "NTKV_NVCC_FLAGS",
    "NTKV_REQUIRE_KERNELS",
    "NTKV_CUDA_TOOLCHAIN",
    "NTKV_KERNEL_CACHE",
    "PATH",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cuda_dir = manifest_dir.join("cuda");
    let include_dir = cuda_dir.join("include");

    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed={}", cuda_dir.display());
    println!("cargo:rerun-if-changed={}", include_dir.display());

    let mut sources: Vec<PathBuf> = fs::read_dir(&cuda_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect()
        })
        .unwrap_or_default();
    sources.sort();
    let mut headers: Vec<PathBuf> = fs::read_dir(&include_dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    headers.sort();
    for p in sources.iter().chain(headers.iter()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let require = env::var("NTKV_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let archs = parse_archs();
    let nvcc = find_nvcc(&manifest_dir);

    let mut images: Vec<(String, Option<PathBuf>)> = Vec::new();
    match &nvcc {
        None => {
            if require {
                panic!(
                    "NTKV_REQUIRE_KERNELS=1 but nvcc was not found (looked at $NVCC, $CUDA_HOME, \
                     $CUDA_PATH, .cuda-toolchain/ and PATH); run tools/install-cuda.sh"
                );
            }
            println!(
                "cargo:warning=ntkv: nvcc not found; building without GPU kernels (the runtime \
                 will report KernelsNotBuilt). Run tools/install-cuda.sh to build them."
            );
            for src in &sources {
                images.push((stem(src), None));
            }
        }
        Some(nvcc) => {
            let header_hash = hash_files(&headers);
            let extra_flags: Vec<String> = env::var("NTKV_NVCC_FLAGS")
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default();
            let cache_dir = kernel_cache_dir(&out_dir);
            let jobs: Vec<_> = sources
                .iter()
                .map(|src| {
                    let nvcc = nvcc.clone();
                    let src = src.clone();
                    let out_dir = out_dir.clone();
                    let cache_dir = cache_dir.clone();
                    let include_dir = include_dir.clone();
                    let archs = archs.clone();
                    let extra = extra_flags.clone();
                    std::thread::spawn(move || {
                        let job = Job { nvcc: &nvcc, src: &src, out_dir: &out_dir, cache_dir: cache_dir.as_deref() };
                        compile(&job, &include_dir, &archs, &extra, header_hash)
                    })
                })
                .collect();
            let mut failures = Vec::new();
            for (src, job) in sources.iter().zip(jobs) {
                match job.join().unwrap_or_else(|_| Err("compiler thread panicked".into())) {
                    Ok((path, warnings)) => {
                        for line in warnings.lines().filter(|l| !l.trim().is_empty()) {
                            println!("cargo:warning=nvcc {}: {line}", stem(src));
                        }
                        images.push((stem(src), Some(path)));
                    }
                    Err(msg) => failures.push(format!("{}:\n{msg}", src.display())),
                }
            }
            if !failures.is_empty() {
                panic!("nvcc failed:\n{}", failures.join("\n"));
            }
        }
    }

    let mut generated = String::from("// @generated by build.rs: one embedded fatbin per cuda/<family>.cu.\n");
    let arch_list = archs.iter().map(|a| format!("sm_{a}")).collect::<Vec<_>>().join(",");
    let built = nvcc.is_some();
    let _ = writeln!(
        generated,
        "/// Architectures the embedded images carry SASS for (PTX for the last); empty when not built.\npub const BUILT_ARCHS: &str = {:?};",
        if built { arch_list.as_str() } else { "" }
    );
    for (name, path) in &images {
        let konst = name.to_uppercase();
        match path {
            Some(p) => {
                let _ = writeln!(
                    generated,
                    "pub static {konst}: Option<&[u8]> = Some(include_bytes!({:?}));",
                    p.display().to_string()
                );
            }
            None => {
                let _ = writeln!(generated, "pub static {konst}: Option<&[u8]> = None;");
            }
        }
    }
    fs::write(out_dir.join("kernels.rs"), generated).expect("write kernels.rs");
}

fn stem(p: &Path) -> String {
    p.file_stem().and_then(|s| s.to_str()).unwrap_or("unknown").to_owned()
}

fn parse_archs() -> Vec<u32> {
    let raw = env::var("NTKV_CUDA_ARCHS").unwrap_or_else(|_| "80,90".to_owned());
    let mut archs: Vec<u32> = raw
        .split(',')
        .map(|s| s.trim().trim_start_matches("sm_").trim_start_matches("compute_"))
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or_else(|_| panic!("NTKV_CUDA_ARCHS: bad architecture {s:?}")))
        .collect();
    archs.sort_unstable();
    archs.dedup();
    assert!(!archs.is_empty(), "NTKV_CUDA_ARCHS is empty");
    archs
}

fn find_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    let runs = |p: &Path| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success());
    if let Ok(p) = env::var("NVCC") {
        let p = PathBuf::from(p);
        if runs(&p) {
            return Some(p);
        }
        println!("cargo:warning=ntkv: NVCC={} does not run; trying other locations", p.display());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(root) = env::var(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if runs(&p) {
                return Some(p);
            }
        }
    }
    let toolchain =
        env::var("NTKV_CUDA_TOOLCHAIN").map(PathBuf::from).unwrap_or_else(|_| manifest_dir.join(".cuda-toolchain"));
    for rel in ["nvidia/cu13/bin/nvcc", "nvidia/cuda_nvcc/bin/nvcc", "bin/nvcc"] {
        let p = toolchain.join(rel);
        if runs(&p) {
            return Some(p);
        }
    }
    let p = PathBuf::from("nvcc");
    runs(&p).then_some(p)
}

fn hash_files(files: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for f in files {
        f.file_name().hash(&mut h);
        fs::read(f).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// `$NTKV_KERNEL_CACHE`, else `<target dir>/ntkv-kernels`: OUT_DIR is
/// `<target dir>/<profile>/build/<pkg>-<hash>/out`, so the cache sits four levels up and is
/// shared by every profile. `None` (no cache, compile into OUT_DIR only) when it cannot be made.
fn kernel_cache_dir(out_dir: &Path) -> Option<PathBuf> {
    let dir = match env::var_os("NTKV_KERNEL_CACHE") {
        Some(d) => PathBuf::from(d),
        None => out_dir.ancestors().nth(4)?.join("ntkv-kernels"),
    };
    fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

struct Job<'a> {
    nvcc: &'a Path,
    src: &'a Path,
    out_dir: &'a Path,
    cache_dir: Option<&'a Path>,
}

/// Floating-point flags of the families whose contract is bit-exactness with the CPU reference
/// (quant codes, top-k keys, k-means labels, ...): IEEE denormals, divisions and square roots.
const IEEE_MATH: &[&str] = &["-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=true"];
/// Floating-point flags of the families whose contract is a tolerance (SPEC's attention and
/// decode bounds): denormals flush to zero, which makes each `exp2f` of the online softmax one
/// `MUFU.EX2` instead of four instructions (the range check and the two scalings that keep a
/// denormal result exact). Divisions and square roots stay IEEE: they are off the hot loops.
const FAST_MATH: &[&str] = &["-ftz=true", "-prec-div=true", "-prec-sqrt=true", "-fmad=true"];
/// The sources compiled with `FAST_MATH`; every other source gets `IEEE_MATH`.
const FAST_MATH_SOURCES: &[&str] = &["attention", "decode", "qdecode"];

/// The floating-point flags of source `stem` (tools/kernel-report parses the three tables above,
/// so that its cubins are compiled as the crate's are).
fn math_flags(stem: &str) -> &'static [&'static str] {
    if FAST_MATH_SOURCES.contains(&stem) {
        FAST_MATH
    } else {
        IEEE_MATH
    }
}

/// Compiles one source unless an image built from the same source, headers, compiler and flags
/// is already in OUT_DIR or in the shared cache. Returns the image path and the compiler's
/// diagnostics.
fn compile(
    job: &Job<'_>,
    include_dir: &Path,
    archs: &[u32],
    extra: &[String],
    header_hash: u64,
) -> Result<(PathBuf, String), String> {
    let Job { nvcc, src, out_dir, cache_dir } = *job;
    let name = stem(src);
    let out = out_dir.join(format!("{name}.fatbin"));
    let mut args: Vec<String> = vec![
        "--fatbin".into(),
        "-std=c++17".into(),
        "-O3".into(),
        "-lineinfo".into(),
        "--expt-relaxed-constexpr".into(),
        "-Xptxas=-warn-spills".into(),
    ];
    args.extend(math_flags(&name).iter().map(|f| (*f).to_owned()));
    for a in archs {
        args.push(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    if let Some(last) = archs.last() {
        args.push(format!("-gencode=arch=compute_{last},code=compute_{last}"));
    }
    args.extend(extra.iter().cloned());

    // The include folder's path is left out of the key (its files are in `header_hash`), so
    // another checkout of the same sources hits the cache.
    let mut h = DefaultHasher::new();
    fs::read(src).map_err(|e| format!("read {}: {e}", src.display()))?.hash(&mut h);
    header_hash.hash(&mut h);
    args.hash(&mut h);
    nvcc.hash(&mut h);
    let key = format!("{:016x}", h.finish());
    let stamp = out_dir.join(format!("{name}.fatbin.key"));
    let cached_log = out_dir.join(format!("{name}.fatbin.log"));
    if out.exists() && fs::read_to_string(&stamp).is_ok_and(|k| k == key) {
        return Ok((out, fs::read_to_string(&cached_log).unwrap_or_default()));
    }
    let shared = cache_dir.map(|d| (d.join(format!("{name}-{key}.fatbin")), d.join(format!("{name}-{key}.log"))));
    if let Some((image, log)) = &shared {
        if image.exists() && log.exists() && fs::copy(image, &out).is_ok() {
            let diagnostics = fs::read_to_string(log).unwrap_or_default();
            fs::write(&cached_log, &diagnostics).map_err(|e| e.to_string())?;
            fs::write(&stamp, key).map_err(|e| e.to_string())?;
            return Ok((out, diagnostics));
        }
    }

    let output = Command::new(nvcc)
        .args(&args)
        .arg(format!("-I{}", include_dir.display()))
        .arg("-o")
        .arg(&out)
        .arg(src)
        .output()
        .map_err(|e| format!("spawn {}: {e}", nvcc.display()))?;
    let diagnostics = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        return Err(diagnostics);
    }
    fs::write(&cached_log, &diagnostics).map_err(|e| e.to_string())?;
    fs::write(&stamp, &key).map_err(|e| e.to_string())?;
    if let Some((image, log)) = &shared {
        // Write then rename, so a concurrent build never reads a half-written image; a failure
        // here only loses the cache entry.
        let tmp = image.with_extension(format!("fatbin.tmp{}", std::process::id()));
        let tmp_log = log.with_extension(format!("log.tmp{}", std::process::id()));
        if fs::copy(&out, &tmp).is_ok() && fs::write(&tmp_log, &diagnostics).is_ok() {
            let _ = fs::rename(&tmp_log, log);
            let _ = fs::rename(&tmp, image);
        }
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_file(&tmp_log);
    }
    Ok((out, diagnostics))
}
