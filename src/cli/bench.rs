//! `sgps bench`: latency and memory of the runtime, and the same ONNX files under onnxruntime.
//!
//! In one invocation: per-capture latency (decode + preprocess + image encoder + head, and each
//! part) for every image-encoder variant in the manifest, text-encoding latency, synthesis latency
//! for a 4-way 5-shot task from cached embeddings and from raw captures, peak RSS (VmHWM), and
//! onnxruntime (Python) on the same model files, same inputs and same thread count, with the
//! tract / onnxruntime ratio. Every figure is the median and p90 of `--reps` timed runs after
//! `--warmup` untimed ones (measured by `sgps::bench`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};

use sgps::bench::{
    PYTHON_ENV, Timing, machine, measure, ort_timing, proc_status_kib, profile_ops, run_ort,
};
use sgps::eval::descriptions;
use sgps::eval::episodes::{EpisodeSpec, ImagePool, sample_episodes};
use sgps::eval::{ISIC_NOVEL, missing_data_message, resolve_data_dir};
use sgps::image_io;
use sgps::pipeline::{ClassSupport, LoadOptions, Pipeline, Shots, SupportInput, SynthMode};

/// `sgps bench`: latency, memory and the tract / onnxruntime ratio.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Data directory (captures are taken from <DATA>/isic/<novel class>/). Default: $SGPS_DATA, else ../shared/data.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Timed repetitions per measurement.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub reps: usize,
    /// Untimed warm-up runs per measurement.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub warmup: usize,
    /// Python with onnxruntime (default: $SGPS_PYTHON, else models/train/.venv/bin/python, else python3).
    #[arg(long, value_name = "PYTHON")]
    pub python: Option<PathBuf>,
    /// Skip the onnxruntime comparison.
    #[arg(long)]
    pub no_ort: bool,
    /// Also write the figures as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Measure everything a second time with this many threads (tract and onnxruntime alike),
    /// as extra columns; 0 = only the --threads run.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub also_threads: usize,
    /// Also time every operator of each encoder (tract's op kinds, most expensive first), at the
    /// --threads count, and print the top N kinds per model (0 = no profile).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub profile: usize,
    /// Only run one model on the bench input, --warmup + --reps times, untimed, one thread, and
    /// print one line: `image:VARIANT` (the encoder on the preprocessed capture) or
    /// `text:VARIANT` (tokenizer + encoder on the first description). For counting instructions
    /// under emulation (`cargo xtask arm-count` runs it at two --reps and takes the difference).
    #[arg(long, value_name = "MODEL:VARIANT", conflicts_with_all = ["json", "profile"])]
    pub only: Option<String>,
}

#[derive(Debug, Serialize)]
struct Row {
    what: String,
    tract: Timing,
    #[serde(skip_serializing_if = "Option::is_none")]
    onnxruntime: Option<Timing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ort_key: Option<String>,
}

/// The bench task: a 4-way 5-shot support set and one query capture from the novel classes.
struct Task {
    pool: ImagePool,
    ep: sgps::eval::episodes::Episode,
    support_paths: Vec<Vec<PathBuf>>,
    capture: PathBuf,
    descs: Vec<descriptions::Description>,
    texts: Vec<String>,
}

/// One pass of every measurement at one thread count: the rows, and the onnxruntime spec of the
/// same models and inputs.
struct Pass {
    threads: usize,
    rows: Vec<Row>,
    ort_models: Vec<Value>,
    raw_reps: usize,
}

fn python_for(args: &BenchArgs, models: &Path) -> PathBuf {
    if let Some(p) = &args.python {
        return p.clone();
    }
    if let Some(p) = std::env::var_os(PYTHON_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = models.join("train/.venv/bin/python");
    if venv.is_file() {
        return venv;
    }
    PathBuf::from("python3")
}

/// `sgps bench`.
pub fn run(args: &BenchArgs, models: &Path, opts: &LoadOptions) -> anyhow::Result<()> {
    anyhow::ensure!(args.reps >= 1, "--reps must be at least 1");
    let data = resolve_data_dir(args.data.as_deref());
    if !data.is_dir() {
        anyhow::bail!(missing_data_message(&data, "bench"));
    }
    let threads = opts.threads.unwrap_or(1).max(1);
    let (w, r) = (args.warmup, args.reps);
    if let Some(only) = &args.only {
        return run_only(only, &data, models, w, r);
    }

    let t = Instant::now();
    let base = Pipeline::load(models, opts)
        .with_context(|| format!("loading the models from {}", models.display()))?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let manifest = base.manifest().clone();

    let task = bench_task(&data, &manifest)?;
    let first = measure_pass(&base, models, opts, threads, w, r, &task)?;
    let peak_kib = proc_status_kib("VmHWM");
    let mut passes = vec![first];
    if args.also_threads > 0 && args.also_threads != threads {
        let mut o = opts.clone();
        o.threads = Some(args.also_threads);
        let more = Pipeline::load(models, &o)
            .with_context(|| format!("loading the models from {}", models.display()))?;
        passes.push(measure_pass(
            &more,
            models,
            &o,
            args.also_threads,
            w,
            r,
            &task,
        )?);
    }

    let profiles = if args.profile > 0 {
        profile_models(&base, r, &task)?
    } else {
        Vec::new()
    };

    // onnxruntime on the same files and inputs, at each pass's thread count.
    let mut ort_note = String::new();
    let mut ort_version = None;
    if !args.no_ort {
        let python = python_for(args, models);
        for pass in passes.iter_mut() {
            let spec =
                json!({"threads": pass.threads, "reps": r, "warmup": w, "models": pass.ort_models});
            match run_ort(&python, &spec) {
                Ok(v) => {
                    ort_version = v
                        .get("onnxruntime")
                        .and_then(|s| s.as_str())
                        .map(String::from);
                    for row in pass.rows.iter_mut() {
                        if let Some(key) = &row.ort_key {
                            row.onnxruntime = ort_timing(&v, key);
                        }
                    }
                }
                Err(e) => {
                    ort_note = format!("onnxruntime comparison skipped: {e:#}");
                    break;
                }
            }
        }
    }

    // Report: one block of columns per thread count.
    let counts: Vec<String> = passes.iter().map(|p| p.threads.to_string()).collect();
    println!(
        "sgps bench — {}
tract, {} thread(s); {r} timed runs after {w} warm-up runs (raw-capture synthesis: {} runs); models loaded in {:.0} ms",
        machine(),
        counts.join(" and "),
        passes[0].raw_reps,
        load_ms
    );
    if let Some(v) = &ort_version {
        println!(
            "onnxruntime {v} (Python, CPUExecutionProvider, intra_op_num_threads = {})",
            counts.join(" and ")
        );
    }
    print!("\n{:<58}", "median ms (p90 in the JSON)");
    for p in &passes {
        let t = p.threads;
        print!(
            " {:>11} {:>10} {:>9}",
            format!("tract {t}t"),
            format!("ort {t}t"),
            "tract/ort"
        );
    }
    println!();
    for (i, row) in passes[0].rows.iter().enumerate() {
        print!("{:<58}", row.what);
        for p in &passes {
            let row = &p.rows[i];
            let (om, ratio) = match &row.onnxruntime {
                Some(o) => (
                    format!("{:.2}", o.median_ms),
                    format!("{:.2}", row.tract.median_ms / o.median_ms),
                ),
                None => (String::new(), String::new()),
            };
            print!(" {:>11.3} {:>10} {:>9}", row.tract.median_ms, om, ratio);
        }
        println!();
    }
    match peak_kib {
        Some(k) => println!(
            "\npeak RSS (VmHWM) after the {}-thread pass: {:.1} MiB",
            passes[0].threads,
            k as f64 / 1024.0
        ),
        None => println!("\npeak RSS: not available on this system"),
    }
    if base.text_encoder().is_some() {
        println!(
            "text-encoder rows: tract includes tokenization (see the tokenize row); onnxruntime times the model only."
        );
    } else {
        println!(
            "the synthesizer reads word features, not the MiniLM embedding: the text encoder is not loaded \
             (time it alone with `--only text:VARIANT`)."
        );
    }
    if !ort_note.is_empty() {
        println!("{ort_note}");
    }
    for p in &profiles {
        println!(
            "\nprofile {} ({threads} thread(s)): {:.3} ms per run in op eval, median of {r} runs",
            p.model, p.profile.total_ms
        );
        println!("{:<28} {:>6} {:>10} {:>7}", "op", "nodes", "ms", "share");
        for o in p.profile.ops.iter().take(args.profile) {
            println!(
                "{:<28} {:>6} {:>10.3} {:>6.1}%",
                o.op,
                o.nodes,
                o.median_ms,
                100.0 * o.share
            );
        }
        println!("slowest nodes:");
        for n in p.profile.nodes.iter().take(args.profile) {
            println!(
                "{:>10.3} ms  {} {} ({})",
                n.median_ms,
                n.op,
                n.node,
                n.info.chars().take(110).collect::<String>()
            );
        }
    }
    if let Some(path) = &args.json {
        let v = json!({
            "machine": machine(),
            "reps": r,
            "warmup": w,
            "models_load_ms": load_ms,
            "peak_rss_kib": peak_kib,
            "onnxruntime_version": ort_version,
            "onnxruntime_note": ort_note,
            "passes": passes.iter().map(|p| json!({"threads": p.threads, "rows": p.rows})).collect::<Vec<_>>(),
            "profiles": profiles,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// `sgps bench --only MODEL:VARIANT`: one model, `w + r` untimed runs on the bench input.
fn run_only(only: &str, data: &Path, models: &Path, w: usize, r: usize) -> anyhow::Result<()> {
    let (model, variant) = only.split_once(':').with_context(|| {
        format!("--only {only:?}: expected image:VARIANT or text:VARIANT (e.g. image:fp32)")
    })?;
    let manifest = sgps::manifest::Manifest::load(models)
        .with_context(|| format!("loading the manifest from {}", models.display()))?;
    let task = bench_task(data, &manifest)?;
    match model {
        "image" => {
            let enc = sgps::encoders::ImageEncoder::load(&manifest, Some(variant))?;
            let img = image_io::load_rgb(&task.capture)?;
            let tensor = enc.preprocess.batch(std::slice::from_ref(&img));
            for _ in 0..w + r {
                enc.embed_tensor(&tensor, 1)?;
            }
            println!("ran the image encoder [{variant}] {} times", w + r);
        }
        "text" => {
            let enc = sgps::encoders::TextEncoder::load(&manifest, Some(variant))?;
            let text = [task.texts[0].as_str()];
            for _ in 0..w + r {
                enc.embed(&text)?;
            }
            println!("ran the text encoder [{variant}] {} times", w + r);
        }
        other => anyhow::bail!("--only {other}:{variant}: the model is `image` or `text`"),
    }
    Ok(())
}

/// Per-operator profile of one model.
#[derive(Debug, Serialize)]
struct Profile {
    model: String,
    #[serde(flatten)]
    profile: sgps::bench::OpProfile,
}

/// Profile every image-encoder variant on the bench capture and the default text encoder on the
/// first description, with the pipeline's thread count.
fn profile_models(base: &Pipeline, reps: usize, task: &Task) -> anyhow::Result<Vec<Profile>> {
    let manifest = base.manifest();
    let img = image_io::load_rgb(&task.capture)?;
    let mut out = Vec::new();
    let mut variants: Vec<String> = manifest.image_encoder.variants.keys().cloned().collect();
    variants.sort();
    for variant in &variants {
        let own;
        let enc = if base.image_encoder().variant == *variant {
            base.image_encoder()
        } else {
            own = sgps::encoders::ImageEncoder::load(manifest, Some(variant))?;
            &own
        };
        let tensor = enc.preprocess.batch(std::slice::from_ref(&img));
        out.push(Profile {
            model: format!("image encoder [{variant}]"),
            profile: profile_ops(enc.plan(), &enc.inputs(&tensor)?, reps)?,
        });
    }
    if let Some(te) = base.text_encoder() {
        let toks = te.tokenize(&[task.texts[0].as_str()])?;
        out.push(Profile {
            model: format!("text encoder [{}] ({} tokens)", te.variant, toks.seq),
            profile: profile_ops(te.plan(), &te.inputs(&toks)?, reps)?,
        });
    }
    Ok(out)
}

/// The bench task from the collection's novel classes (seed 0).
fn bench_task(data: &Path, manifest: &sgps::manifest::Manifest) -> anyhow::Result<Task> {
    // A 4-way 5-shot task + one query capture from the novel classes.
    let classes: Vec<String> = ISIC_NOVEL.iter().map(|s| s.to_string()).collect();
    let pool = ImagePool::open(data, &classes)?;
    let spec = EpisodeSpec {
        ways: 4,
        shots: 5,
        queries: 1,
        episodes: 1,
        seed: 0,
    };
    let ep = sample_episodes(&pool, &spec)?.remove(0);
    let support_paths: Vec<Vec<PathBuf>> = ep
        .support
        .iter()
        .map(|s| s.iter().map(|&i| pool.path(i)).collect())
        .collect();
    let capture = pool.path(ep.queries[0][0]);
    let keys: Vec<(String, String)> = pool
        .classes
        .iter()
        .map(|c| (c.rel.clone(), c.name.clone()))
        .collect();
    let descs = descriptions::resolve(&keys, None, &manifest.dir.join("train/descriptions.json"))?;
    let texts: Vec<String> = descs
        .iter()
        .map(|d| d.text.clone().unwrap_or_else(|| d.class.clone()))
        .collect();

    Ok(Task {
        pool,
        ep,
        support_paths,
        capture,
        descs,
        texts,
    })
}

/// Every measurement once, with `threads` threads (tract's executor is process-wide: `base` was
/// loaded with them, and so is every other variant loaded here).
fn measure_pass(
    base: &Pipeline,
    models: &Path,
    opts: &LoadOptions,
    threads: usize,
    w: usize,
    r: usize,
    task: &Task,
) -> anyhow::Result<Pass> {
    let Task {
        pool,
        ep,
        support_paths,
        capture,
        descs,
        texts,
    } = task;
    let text_refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let all_support: Vec<PathBuf> = support_paths.iter().flatten().cloned().collect();
    let manifest = base.manifest();
    let mut rows: Vec<Row> = Vec::new();
    let mut ort_models: Vec<Value> = Vec::new();
    let tensor_shape = |n: usize| {
        let [h, wd] = manifest.image_encoder.input_size;
        vec![n, 3, h, wd]
    };

    // Per-capture latency for every image-encoder variant.
    let mut variants: Vec<String> = manifest.image_encoder.variants.keys().cloned().collect();
    variants.sort();
    for variant in &variants {
        let own;
        let p: &Pipeline = if base.image_encoder().variant == *variant {
            base
        } else {
            let mut o = opts.clone();
            o.image_variant = Some(variant.clone());
            own = Pipeline::load(models, &o)
                .with_context(|| format!("loading image-encoder variant {variant}"))?;
            &own
        };
        let enc = p.image_encoder();
        let support = embed_classes(p, pool, ep, support_paths, descs)?;
        let clf = p.synthesize(&support, SynthMode::ImagesAndText)?;
        let img = image_io::load_rgb(capture)?;
        let tensor = enc.preprocess.batch(std::slice::from_ref(&img));
        let emb = enc.embed_tensor(&tensor, 1)?.remove(0);
        rows.push(Row {
            what: format!("capture [{variant}]: decode"),
            tract: measure(w, r, || Ok(image_io::load_rgb(capture)?))?,
            onnxruntime: None,
            ort_key: None,
        });
        rows.push(Row {
            what: format!("capture [{variant}]: preprocess"),
            tract: measure(w, r, || {
                Ok(enc.preprocess.batch(std::slice::from_ref(&img)))
            })?,
            onnxruntime: None,
            ort_key: None,
        });
        let key = format!("image_encoder_{variant}");
        rows.push(Row {
            what: format!("capture [{variant}]: image encoder (model)"),
            tract: measure(w, r, || Ok(enc.embed_tensor(&tensor, 1)?))?,
            onnxruntime: None,
            ort_key: Some(key.clone()),
        });
        ort_models.push(json!({
            "name": key,
            "path": manifest.dir.join(&manifest.image_encoder.variants[variant].file),
            "inputs": {manifest.image_encoder.input.clone(): {"dtype": "float32", "shape": tensor_shape(1), "data": tensor}},
        }));
        rows.push(Row {
            what: format!("capture [{variant}]: head"),
            tract: measure(w, r, || Ok(clf.predict(&emb)))?,
            onnxruntime: None,
            ort_key: None,
        });
        rows.push(Row {
            what: format!("capture [{variant}]: end to end"),
            tract: measure(w, r, || {
                let e = p.embed_image_file(capture)?;
                Ok(clf.predict(&e))
            })?,
            onnxruntime: None,
            ort_key: None,
        });
    }

    // Text features of one description: the MiniLM encoder (default variant) where G reads it,
    // the word features where G reads them.
    let text = &text_refs[0];
    if let Some(words) = base.word_features() {
        rows.push(Row {
            what: format!("text: word features ({} words)", words.dim()),
            tract: measure(w, r, || Ok(words.vector(text)))?,
            onnxruntime: None,
            ort_key: None,
        });
    }
    if let Some(te) = base.text_encoder() {
        let toks = te.tokenize(&[text])?;
        rows.push(Row {
            what: format!("text: tokenize ({} tokens)", toks.seq),
            tract: measure(w, r, || Ok(te.tokenize(&[text])?))?,
            onnxruntime: None,
            ort_key: None,
        });
        rows.push(Row {
            what: "text: tokenize + encoder".into(),
            tract: measure(w, r, || Ok(base.embed_texts(&[text])?))?,
            onnxruntime: None,
            ort_key: Some("text_encoder".into()),
        });
        let ts = &manifest.text_encoder;
        let mut text_inputs = serde_json::Map::new();
        let shape = [toks.n, toks.seq];
        text_inputs.insert(
            ts.inputs.input_ids.clone(),
            json!({"dtype": "int64", "shape": shape, "data": toks.input_ids}),
        );
        text_inputs.insert(
            ts.inputs.attention_mask.clone(),
            json!({"dtype": "int64", "shape": shape, "data": toks.attention_mask}),
        );
        if let Some(tt) = &ts.inputs.token_type_ids {
            text_inputs.insert(
                tt.clone(),
                json!({"dtype": "int64", "shape": shape, "data": toks.token_type_ids}),
            );
        }
        ort_models.push(json!({
            "name": "text_encoder",
            "path": manifest.dir.join(&ts.variants[&te.variant].file),
            "inputs": text_inputs,
        }));
    }

    // Synthesis, 4-way 5-shot with descriptions.
    let support = embed_classes(base, pool, ep, support_paths, descs)?;
    let synth = base.synthesizer();
    let inputs = synth
        .limits
        .build_inputs(&support, SynthMode::ImagesAndText)?;
    rows.push(Row {
        what: "synthesis 4-way 5-shot: synthesizer (model)".into(),
        tract: measure(w, r, || Ok(synth.run_inputs(&inputs)?))?,
        onnxruntime: None,
        ort_key: Some("synthesizer".into()),
    });
    let ss = &manifest.synthesizer;
    let (n, k) = (inputs.n, inputs.k);
    let (d, td) = (manifest.image_encoder.embedding_dim, manifest.text_dim());
    ort_models.push(json!({
        "name": "synthesizer",
        "path": manifest.dir.join(&ss.file),
        "inputs": {
            ss.inputs.support.clone(): {"dtype": "float32", "shape": [n, k, d], "data": inputs.support},
            ss.inputs.support_mask.clone(): {"dtype": "float32", "shape": [n, k], "data": inputs.support_mask},
            ss.inputs.text.clone(): {"dtype": "float32", "shape": [n, td], "data": inputs.text},
            ss.inputs.text_mask.clone(): {"dtype": "float32", "shape": [n], "data": inputs.text_mask},
        },
    }));
    rows.push(Row {
        what: "synthesis 4-way 5-shot: from cached embeddings".into(),
        tract: measure(w, r, || {
            Ok(base.synthesize(&support, SynthMode::ImagesAndText)?)
        })?,
        onnxruntime: None,
        ort_key: None,
    });
    let raw_reps = r.div_ceil(4).max(1);
    rows.push(Row {
        what: format!(
            "synthesis 4-way 5-shot: from {} raw captures + 4 texts",
            all_support.len()
        ),
        tract: measure(w.min(1), raw_reps, || {
            let s = embed_classes(base, pool, ep, support_paths, descs)?;
            Ok(base.synthesize(&s, SynthMode::ImagesAndText)?)
        })?,
        onnxruntime: None,
        ort_key: None,
    });
    Ok(Pass {
        threads,
        rows,
        ort_models,
        raw_reps,
    })
}

/// The bench task's support set (raw files, descriptions; a class without one is described by
/// its name) through the pipeline's support builder.
fn embed_classes(
    p: &Pipeline,
    pool: &ImagePool,
    ep: &sgps::eval::episodes::Episode,
    support_paths: &[Vec<PathBuf>],
    descs: &[descriptions::Description],
) -> anyhow::Result<Vec<ClassSupport>> {
    Ok(p.support(
        ep.classes
            .iter()
            .zip(support_paths)
            .map(|(&c, paths)| {
                let text = descs[c].text.as_deref().unwrap_or(&pool.classes[c].name);
                SupportInput::new(
                    &pool.classes[c].name,
                    Some(text.to_owned()),
                    Shots::Files(paths.clone()),
                )
            })
            .collect(),
    )?)
}
