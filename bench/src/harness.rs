//! The bench runner's harness: where each family registers its timings.
//!
//! A family module calls [`Bench::gpu`] (CUDA-event median after warm-up) or [`Bench::cpu`]
//! (wall-clock median of the CPU reference) once per case. Each record carries the bytes and
//! FLOPs the operation must move or do at minimum, so the table can show GB/s, TFLOP/s and
//! the share of the copy-bandwidth ceiling measured at the start of the same run.

use ntkv::{timing, Device};

/// What a timed case runs: called with the repetition index.
pub trait Body: FnMut(usize) -> ntkv::Result<()> {}
impl<F: FnMut(usize) -> ntkv::Result<()>> Body for F {}

/// The result of recording a case.
pub type Done = ntkv::Result<()>;

/// One timed case.
#[derive(Clone, Debug)]
pub struct Record {
    pub family: &'static str,
    /// Operation name; the peer script uses the same name for the same case.
    pub op: String,
    /// Shape string, for example `4194304x128 g32 int4`.
    pub shape: String,
    pub dtype: String,
    /// `gpu` or `cpu` (the CPU reference, when there is no GPU).
    pub backend: &'static str,
    pub median_ms: f64,
    pub reps: usize,
    /// Minimum bytes read + written.
    pub bytes: f64,
    /// Floating-point operations (0 for memory-bound ops).
    pub flops: f64,
}

impl Record {
    #[allow(clippy::too_many_arguments)]
    fn new(
        family: &'static str,
        op: &str,
        shape: &str,
        dtype: &str,
        backend: &'static str,
        median_ms: f64,
        reps: usize,
        work: Work,
    ) -> Self {
        Record {
            family,
            op: op.to_owned(),
            shape: shape.to_owned(),
            dtype: dtype.to_owned(),
            backend,
            median_ms,
            reps,
            bytes: work.bytes,
            flops: work.flops,
        }
    }

    pub fn gbps(&self) -> f64 {
        if self.median_ms > 0.0 {
            self.bytes / (self.median_ms * 1e-3) / 1e9
        } else {
            0.0
        }
    }
    pub fn tflops(&self) -> f64 {
        if self.median_ms > 0.0 {
            self.flops / (self.median_ms * 1e-3) / 1e12
        } else {
            0.0
        }
    }
    /// The key the comparison script joins on.
    pub fn key(&self) -> String {
        format!("{}|{}|{}", self.op, self.shape, self.dtype)
    }
}

/// What a case moves and computes, for the derived columns.
#[derive(Clone, Copy, Debug, Default)]
pub struct Work {
    pub bytes: f64,
    pub flops: f64,
}

impl Work {
    pub fn bytes(bytes: f64) -> Self {
        Work { bytes, flops: 0.0 }
    }
    pub fn flops(flops: f64) -> Self {
        Work { bytes: 0.0, flops }
    }
}

pub struct Bench {
    pub device: Option<Device>,
    /// Why there is no device, when there is none.
    pub no_device_reason: Option<String>,
    pub copy_gbps: Option<f64>,
    pub reps: usize,
    pub warmup: usize,
    filters: Vec<String>,
    pub records: Vec<Record>,
}

impl Bench {
    pub fn new(device: Result<Device, ntkv::Error>, reps: usize, warmup: usize, filters: Vec<String>) -> Self {
        let (device, no_device_reason) = match device {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e.to_string())),
        };
        Bench { device, no_device_reason, copy_gbps: None, reps, warmup, filters, records: Vec::new() }
    }

    /// Whether a case whose op name is `op` passes the `--filter` arguments.
    pub fn wants(&self, family: &str, op: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| op.contains(f.as_str()) || family == f)
    }

    /// Measures the copy-bandwidth ceiling (2 GiB copied, read + write bytes).
    pub fn measure_ceiling(&mut self) -> ntkv::Result<()> {
        if let Some(dev) = &self.device {
            let bytes = (2usize << 30).min((dev.props().total_mem_bytes / 8) as usize);
            self.copy_gbps = Some(timing::copy_bandwidth_gbps(dev, bytes, self.reps)?);
        }
        Ok(())
    }

    /// Times a GPU case: `warmup` untimed calls, then the median of `reps` event-timed calls.
    pub fn gpu(&mut self, family: &'static str, op: &str, shape: &str, dtype: &str, work: Work, f: impl Body) -> Done {
        let Some(dev) = &self.device else { return Ok(()) };
        let ms = timing::median_gpu_ms(dev, self.warmup, self.reps, f)?;
        self.records.push(Record::new(family, op, shape, dtype, "gpu", ms, self.reps, work));
        Ok(())
    }

    /// Times the CPU reference of a case (used when there is no GPU; at most 5 repetitions).
    pub fn cpu(&mut self, family: &'static str, op: &str, shape: &str, dtype: &str, work: Work, f: impl Body) -> Done {
        let ms = timing::median_cpu_ms(1, self.reps.clamp(1, 5), f)?;
        self.records.push(Record::new(family, op, shape, dtype, "cpu", ms, self.reps.clamp(1, 5), work));
        Ok(())
    }

    pub fn print_table(&self) {
        let header = format!(
            "{:<24} {:<46} {:<5} {:<4} {:>11} {:>9} {:>9} {:>8}",
            "op", "shape", "dtype", "on", "median", "GB/s", "TFLOP/s", "%copy"
        );
        println!("{header}");
        println!("{}", "-".repeat(header.len()));
        for r in &self.records {
            let pct = match (self.copy_gbps, r.bytes > 0.0, r.backend) {
                (Some(c), true, "gpu") => format!("{:.1}%", 100.0 * r.gbps() / c),
                _ => "-".to_owned(),
            };
            let gbps = if r.bytes > 0.0 { format!("{:.1}", r.gbps()) } else { "-".to_owned() };
            let tflops = if r.flops > 0.0 { format!("{:.2}", r.tflops()) } else { "-".to_owned() };
            println!(
                "{:<24} {:<46} {:<5} {:<4} {:>11} {:>9} {:>9} {:>8}",
                r.op,
                r.shape,
                r.dtype,
                r.backend,
                fmt_ms(r.median_ms),
                gbps,
                tflops,
                pct
            );
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let device = self.device.as_ref().map(|d| {
            serde_json::json!({
                "name": d.props().name,
                "compute_capability": format!("{}.{}", d.props().compute_capability.0, d.props().compute_capability.1),
                "sm_count": d.props().sm_count,
            })
        });
        let records: Vec<_> = self
            .records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "key": r.key(),
                    "family": r.family,
                    "op": r.op,
                    "shape": r.shape,
                    "dtype": r.dtype,
                    "backend": r.backend,
                    "median_ms": r.median_ms,
                    "reps": r.reps,
                    "bytes": r.bytes,
                    "flops": r.flops,
                    "gbps": r.gbps(),
                    "tflops": r.tflops(),
                    "pct_copy": self.copy_gbps.filter(|_| r.bytes > 0.0 && r.backend == "gpu").map(|c| 100.0 * r.gbps() / c),
                })
            })
            .collect();
        serde_json::json!({
            "tool": "ntkv-bench",
            "version": env!("CARGO_PKG_VERSION"),
            "device": device,
            "no_device_reason": self.no_device_reason,
            "kernels_built_for": ntkv::built_archs(),
            "copy_gbps": self.copy_gbps,
            "records": records,
        })
    }
}

pub fn fmt_ms(ms: f64) -> String {
    if ms >= 1.0 {
        format!("{ms:.3} ms")
    } else {
        format!("{:.1} us", ms * 1e3)
    }
}
