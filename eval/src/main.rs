//! `ntkv-eval`: what each ntkv KV-cache policy costs in accuracy on SmolLM2-135M.
//!
//! ```text
//! ntkv-eval [run] [--context 4096] [--continuation 128] [--budgets 0.05,0.1,0.25,0.5]
//!           [--policies full,streaming,h2o,snapkv,windowkv,lazy,prefixkv,quest,cluster,shadowkv,lowrank,kivi,mikv] [--kivi-bits 4,2]
//!           [--mikv-bits 2] [--passkey 2048,4096,8192|none] [--passkey-depths 0.5]
//!           [--window 32] [--threads 2] [--model PATH] [--text PATH] [--out DIR] [--gpu]
//! ntkv-eval logits --tokens 512 --out DIR [--act-q8]  # prefill logits for tools/llama-check.py
//! ntkv-eval tokenize --chars 20000 --out DIR  # token ids for tools/llama-check.py
//! ```

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use ntkv_eval::gguf::Gguf;
use ntkv_eval::model::Model;
use ntkv_eval::passkey;
use ntkv_eval::policy::{self, Spec};
use ntkv_eval::report::{Budget, PasskeyRow, Quality, Report, Row, Setup, Source, Timing};
use ntkv_eval::run::{decode, prefill};
use ntkv_eval::tokenizer::Bpe;
use ntkv_eval::{repo_root, MODEL_FILE, TEXT_FILE};

struct Args {
    cmd: String,
    opts: HashMap<String, String>,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut it = std::env::args().skip(1).peekable();
        let cmd = match it.peek() {
            Some(c) if !c.starts_with("--") => it.next().unwrap_or_default(),
            _ => "run".to_string(),
        };
        let mut opts = HashMap::new();
        while let Some(a) = it.next() {
            let key = a.strip_prefix("--").with_context(|| format!("unexpected argument `{a}`"))?.to_string();
            let value = if key == "gpu" || key == "act-q8" {
                "1".to_string()
            } else {
                it.next().with_context(|| format!("--{key} needs a value"))?
            };
            opts.insert(key, value);
        }
        Ok(Args { cmd, opts })
    }

    fn get(&self, key: &str, default: &str) -> String {
        self.opts.get(key).cloned().unwrap_or_else(|| default.to_string())
    }

    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        self.get(key, &default.to_string()).parse().with_context(|| format!("--{key}"))
    }

    fn list<T: std::str::FromStr>(&self, key: &str, default: &str) -> Result<Vec<T>> {
        let v = self.get(key, default);
        if v == "none" {
            return Ok(Vec::new());
        }
        v.split(',').map(|s| s.trim().parse::<T>().map_err(|_| anyhow::anyhow!("--{key}: bad value `{s}`"))).collect()
    }

    fn path(&self, key: &str, default: &str) -> PathBuf {
        self.opts.get(key).map(PathBuf::from).unwrap_or_else(|| repo_root().join(default))
    }
}

fn load(args: &Args) -> Result<(Model, Bpe, String)> {
    let path = args.path("model", MODEL_FILE);
    ensure!(path.exists(), "{} is missing: run tools/fetch-model.sh first", path.display());
    let g = Gguf::open(&path)?;
    let t = Instant::now();
    let model = Model::load(&g)?;
    let tok = Bpe::from_gguf(&g)?;
    eprintln!("loaded {} ({} layers) in {:.1} s", path.display(), model.cfg.layers, t.elapsed().as_secs_f64());
    Ok((model, tok, path.display().to_string()))
}

fn read_text(args: &Args) -> Result<String> {
    let path = args.path("text", TEXT_FILE);
    fs::read_to_string(&path).with_context(|| format!("{}: run tools/fetch-text.sh first", path.display()))
}

/// The policies at each budget, for a prompt of `p` tokens and keys of `key_cols` = `Hkv·D`
/// channels (low-rank budgets are ranks, as a share of them).
fn specs(args: &Args, p: usize, key_cols: usize) -> Result<Vec<(Spec, Option<f64>)>> {
    let families: Vec<String> = args.list(
        "policies",
        "full,streaming,h2o,snapkv,windowkv,lazy,prefixkv,quest,cluster,shadowkv,lowrank,kivi,mikv",
    )?;
    let budgets: Vec<f64> = args.list("budgets", "0.05,0.1,0.25,0.5")?;
    let kivi_bits: Vec<u32> = args.list("kivi-bits", "4,2")?;
    let mikv_bits = args.usize("mikv-bits", 2)? as u32;
    let mut out = Vec::new();
    for f in &families {
        match f.as_str() {
            "full" => out.push((Spec::Full, None)),
            "kivi" => out.extend(kivi_bits.iter().map(|&bits| (Spec::Kivi { bits }, None))),
            _ => {
                for &b in &budgets {
                    ensure!(b > 0.0 && b < 1.0, "budget {b} is not a fraction in (0, 1)");
                    let budget = ((b * p as f64).round() as usize).max(2);
                    let s = match f.as_str() {
                        "streaming" => Spec::Streaming { budget },
                        "h2o" => Spec::H2o { budget },
                        "snapkv" => Spec::SnapKv { budget },
                        "quest" => Spec::Quest { budget },
                        "cluster" => Spec::Cluster { budget },
                        "shadowkv" => Spec::ShadowKv { budget },
                        "windowkv" => Spec::WindowKv { budget },
                        "lazy" => Spec::Lazy { budget },
                        "prefixkv" => Spec::PrefixKv { budget },
                        "lowrank" => Spec::LowRank { rank: ((b * key_cols as f64).round() as usize).max(1) },
                        "mikv" => Spec::Mikv { budget, lo_bits: mikv_bits },
                        other => bail!("unknown policy `{other}`"),
                    };
                    out.push((s, Some(b)));
                }
            }
        }
    }
    ensure!(out.first().map(|s| s.0) == Some(Spec::Full), "--policies must start with full (the baseline)");
    Ok(out)
}

/// A full-cache run's attention outputs per layer (`[N, Hq·D]` each) and argmax tokens.
type Reference = (Vec<Vec<f32>>, Vec<u32>);

fn bits_of(s: Spec) -> Option<u32> {
    match s {
        Spec::Kivi { bits } => Some(bits),
        Spec::Mikv { lo_bits, .. } => Some(lo_bits),
        _ => None,
    }
}

fn cmd_run(args: &Args) -> Result<()> {
    if args.opts.contains_key("gpu") {
        bail!("--gpu: the GPU path is not wired into ntkv-eval yet (GPU verification pending)");
    }
    let (model, tok, model_path) = load(args)?;
    let text = read_text(args)?;
    let (p, n) = (args.usize("context", 4096)?, args.usize("continuation", 128)?);
    let window = args.usize("window", 32)?;
    let ids = tok.encode(&text)?;
    ensure!(ids.len() > p + n + 1, "the text has {} tokens, fewer than {}", ids.len(), p + n + 1);
    ensure!(p + n <= model.cfg.context, "context + continuation exceeds the model's {}", model.cfg.context);
    let out = args.path("out", "eval-results");
    let t = Instant::now();
    let (pre, _) = prefill(&model, &ids[..p], window, false)?;
    let prefill_secs = t.elapsed().as_secs_f64();
    eprintln!("prefill of {p} tokens: {prefill_secs:.1} s");
    let (fed, targets) = (&ids[p..p + n], &ids[p + 1..p + n + 1]);
    let threads = args.usize("threads", 2)?.max(1);
    let key_cols = model.cfg.hkv * model.cfg.head_dim;
    let all = specs(args, p, key_cols)?;
    let score = |spec: Spec, frac: Option<f64>, reference: Option<&Reference>| -> Result<(Row, Reference)> {
        let mut pol = policy::build(spec, &pre, p + n)?;
        let d = decode(&model, p, fed, targets, pol.as_mut(), reference.map(|r| r.0.as_slice()), reference.is_none())?;
        let ppl = (d.nll.iter().sum::<f64>() / n as f64).exp();
        let (agree, errs) = match reference {
            Some((_, top)) => {
                let same = d.top1.iter().zip(top).filter(|(a, b)| a == b).count();
                (same as f64 / n as f64, d.attn_rel_err.clone())
            }
            None => (1.0, vec![0.0; model.cfg.layers]),
        };
        let row = Row {
            policy: spec.family().to_string(),
            label: spec.to_string(),
            budget: Budget { frac, bits: bits_of(spec) },
            quality: Quality {
                ppl,
                top1_agree: agree,
                attn_rel_err: errs.iter().sum::<f64>() / errs.len() as f64,
                attn_rel_err_layers: errs,
            },
            timing: Timing {
                attn_ms_per_step: d.attn_secs * 1e3 / n as f64,
                decode_ms_per_step: d.total_secs * 1e3 / n as f64,
            },
        };
        eprintln!(
            "{:<28} ppl {:8.3}  top-1 {:5.1}%  attn err {:.4}  {:.1} s",
            row.label,
            row.quality.ppl,
            row.quality.top1_agree * 100.0,
            row.quality.attn_rel_err,
            d.total_secs
        );
        Ok((row, (d.attn.unwrap_or_default(), d.top1)))
    };
    let (full_row, reference) = score(all[0].0, all[0].1, None)?;
    let mut rows = vec![full_row];
    for r in par_map(&all[1..], threads, |&(spec, frac)| score(spec, frac, Some(&reference))) {
        rows.push(r?.0);
    }
    drop(pre);
    let lens: Vec<usize> = args.list("passkey", "2048,4096,8192")?;
    let depths: Vec<f64> = args.list("passkey-depths", "0.5")?;
    let mut report = Report {
        source: Source {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            text: "Jane Austen, Pride and Prejudice (public domain), from Debian's r-cran-janeaustenr 1.0.0-1".into(),
            model: model_path,
            device: "CPU (ntkv CPU references)".into(),
        },
        setup: Setup { context: p, continuation: n, prefill_secs, passkey_depths: depths.clone() },
        rows,
        passkey: Vec::new(),
    };
    // Written now and after each passkey length, so a long run leaves its results as it goes.
    report.write(&out)?;
    let mut passkey_rows: Vec<PasskeyRow> = Vec::new();
    for &len in &lens {
        ensure!(len <= model.cfg.context, "passkey length {len} exceeds the model's context");
        for (i, &depth) in depths.iter().enumerate() {
            let trial = passkey::trial(&tok, len, depth, i)?;
            let pl = trial.prompt.len() - 1;
            let t = Instant::now();
            let (pre, _) = prefill(&model, &trial.prompt[..pl], window, false)?;
            eprintln!("passkey {len} (depth {depth}, {} tokens): prefill {:.1} s", pl + 1, t.elapsed().as_secs_f64());
            let mut fed = vec![trial.prompt[pl]];
            fed.extend_from_slice(&trial.answer[..trial.answer.len() - 1]);
            let trial_specs = specs(args, pl, key_cols)?;
            let oks = par_map(&trial_specs, threads, |&(spec, _)| -> Result<bool> {
                let mut pol = policy::build(spec, &pre, pl + fed.len())?;
                let d = decode(&model, pl, &fed, &trial.answer, pol.as_mut(), None, false)?;
                Ok(d.top1 == trial.answer)
            });
            for (j, ((spec, frac), ok)) in trial_specs.iter().zip(oks).enumerate() {
                let ok = ok?;
                if passkey_rows.len() <= j {
                    let label = match frac {
                        Some(f) => format!("{} ({:.0}%)", spec.family(), f * 100.0),
                        None => spec.to_string(),
                    };
                    passkey_rows.push(PasskeyRow { label, results: Vec::new() });
                }
                let row = &mut passkey_rows[j];
                match row.results.iter_mut().find(|r| r.0 == len) {
                    Some(r) => {
                        r.1 += usize::from(ok);
                        r.2 += 1;
                    }
                    None => row.results.push((len, usize::from(ok), 1)),
                }
            }
        }
        report.passkey = passkey_rows.clone();
        report.write(&out)?;
    }
    println!("{}", report.markdown());
    eprintln!("wrote {}/report.json, report.md, quality.png", out.display());
    Ok(())
}

/// `f` over `items` on `threads` threads, results in the items' order.
fn par_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let mut out: Vec<(usize, R)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.min(items.len()).max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        done.push((i, f(item)));
                    }
                    done
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    out.sort_by_key(|r| r.0);
    out.into_iter().map(|r| r.1).collect()
}

fn cmd_logits(args: &Args) -> Result<()> {
    let (mut model, tok, _) = load(args)?;
    model.set_activation_q8(args.opts.contains_key("act-q8"));
    let n = args.usize("tokens", 512)?;
    let ids = tok.encode(&read_text(args)?)?;
    ensure!(ids.len() >= n, "the text has only {} tokens", ids.len());
    let (_, logits) = prefill(&model, &ids[..n], 1, true)?;
    let logits = logits.context("prefill returned no logits")?;
    let out = args.path("out", "eval-results/logits");
    fs::create_dir_all(&out)?;
    fs::write(out.join("tokens.json"), serde_json::to_string(&ids[..n])?)?;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(out.join("logits.f32"), bytes)?;
    println!("wrote {n} tokens and [{n}, {}] logits to {}", model.cfg.vocab, out.display());
    Ok(())
}

fn cmd_tokenize(args: &Args) -> Result<()> {
    let g = Gguf::open(&args.path("model", MODEL_FILE))?;
    let tok = Bpe::from_gguf(&g)?;
    let text = read_text(args)?;
    let chars = args.usize("chars", usize::MAX)?;
    let text: String = text.chars().take(chars).collect();
    let ids = tok.encode(&text)?;
    let out = args.path("out", "eval-results/tokens");
    fs::create_dir_all(&out)?;
    fs::write(out.join("text.txt"), &text)?;
    fs::write(out.join("ids.json"), serde_json::to_string(&ids)?)?;
    println!("wrote {} tokens of {} characters to {}", ids.len(), text.chars().count(), out.display());
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse()?;
    match args.cmd.as_str() {
        "run" => cmd_run(&args),
        "logits" => cmd_logits(&args),
        "tokenize" => cmd_tokenize(&args),
        other => bail!("unknown command `{other}` (run, logits, tokenize)"),
    }
}
