//! `ntkv-bench`: the microbenchmark runner.
//!
//! On a GPU it measures the copy-bandwidth ceiling, then times every operation with CUDA
//! events (median of `--reps` runs after warm-up) at the shapes of `docs/benchmarks.md`,
//! and prints one table (op, shape, dtype, time, GB/s, TFLOP/s, % of the copy ceiling).
//! Without a GPU it says why, and times the CPU references at small sizes instead.
//!
//! `--json PATH` also writes the records, which `tools/compare.py` joins with the torch
//! peers' timings from `tools/peers/run.py`.

mod attention;
mod cluster;
mod decode;
mod geometry;
mod harness;
mod lowrank;
mod ntk;
mod pages;
mod policy;
mod qdecode;
mod quant;
mod topk;

use std::process::ExitCode;

use clap::Parser;
use harness::Bench;

#[derive(Parser, Debug)]
#[command(name = "ntkv-bench", about = "Time ntkv's kernels against the in-run copy ceiling")]
struct Args {
    /// Only run cases whose op name contains one of these strings (or whose family is named).
    #[arg(long = "filter", short = 'f')]
    filters: Vec<String>,
    /// Timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Untimed warm-up calls per case.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Run the CPU reference even when a GPU is present.
    #[arg(long)]
    cpu: bool,
    /// Write the records as JSON to this path.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Print the launch geometry the planners pick for every bench shape on 132 SMs (no GPU
    /// needed; with `--json PATH`, also as JSON) and exit.
    #[arg(long)]
    geometry: bool,
}

/// How a family runs its cases: one function that picks the GPU or the CPU cases itself, or
/// a GPU and a CPU function that the runner picks between.
enum Family {
    Whole(fn(&mut Bench) -> ntkv::Result<()>),
    Split(fn(&mut Bench, &ntkv::Device) -> ntkv::Result<()>, fn(&mut Bench) -> ntkv::Result<()>),
}

impl Family {
    fn run(&self, b: &mut Bench) -> ntkv::Result<()> {
        match (self, b.device.clone()) {
            (Family::Whole(f), _) => f(b),
            (Family::Split(gpu, _), Some(dev)) => gpu(b, &dev),
            (Family::Split(_, cpu), None) => cpu(b),
        }
    }
}

const FAMILIES: &[(&str, Family)] = &[
    ("quant", Family::Split(quant::run_gpu, quant::run_cpu)),
    ("topk", Family::Split(topk::run_gpu, topk::run_cpu)),
    ("attention", Family::Whole(attention::run)),
    ("decode", Family::Whole(decode::run)),
    ("ntk", Family::Split(ntk::run_gpu, ntk::run_cpu)),
    ("cluster", Family::Split(cluster::gpu_cases, cluster::cpu_cases)),
    ("pages", Family::Split(pages::gpu_cases, pages::cpu_cases)),
    ("lowrank", Family::Whole(lowrank::run)),
    ("qdecode", Family::Whole(qdecode::run)),
    ("policy", Family::Split(policy::run_gpu, policy::run_cpu)),
];

fn main() -> ExitCode {
    let args = Args::parse();
    if args.geometry {
        return geometry::run(args.json.as_deref()).map_or_else(
            |e| {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            },
            |()| ExitCode::SUCCESS,
        );
    }
    let device = if args.cpu {
        Err(ntkv::Error::invalid("--cpu", "the CPU reference was asked for"))
    } else {
        ntkv::Device::new(args.device).and_then(|d| {
            if ntkv::kernels_built() {
                Ok(d)
            } else {
                Err(ntkv::Error::KernelsNotBuilt { module: "all" })
            }
        })
    };
    let mut bench = Bench::new(device, args.reps.max(1), args.warmup, args.filters.clone());
    match (&bench.device, &bench.no_device_reason) {
        (Some(d), _) => println!(
            "ntkv-bench on {} (sm_{}{}, {} SMs), kernels for {}",
            d.props().name,
            d.props().compute_capability.0,
            d.props().compute_capability.1,
            d.props().sm_count,
            ntkv::built_archs()
        ),
        (None, reason) if std::env::var("NTKV_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            eprintln!(
                "error: NTKV_REQUIRE_GPU=1 but there is no usable GPU: {}",
                reason.as_deref().unwrap_or("unknown")
            );
            return ExitCode::FAILURE;
        }
        (None, reason) => println!(
            "ntkv-bench: no GPU ({}). Timing the CPU reference at small sizes instead; \
             these are not GPU figures.",
            reason.as_deref().unwrap_or("unknown")
        ),
    }
    if let Err(e) = bench.measure_ceiling() {
        eprintln!("error: measuring the copy ceiling: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(c) = bench.copy_gbps {
        println!("copy ceiling (read + write, in this run): {c:.1} GB/s");
    }
    println!();
    let mut failed = false;
    for (name, family) in FAMILIES {
        if let Err(e) = family.run(&mut bench) {
            eprintln!("error in family {name}: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            failed = true;
        }
    }
    bench.print_table();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&bench.to_json()).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("error: writing {}: {e}", path.display());
            failed = true;
        } else {
            println!("\nwrote {}", path.display());
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
