//! The library in one page: load a Hugging Face model directory, stream a greedy continuation
//! of a prompt, and print the statistics.
//!
//! ```text
//! cargo run --release -- init --preset tiny --out /tmp/tiny      # any V3-architecture model dir
//! cargo run --release --example generate -- /tmp/tiny 5,17,200    # ids (no tokenizer.json)
//! cargo run --release --example generate -- MODEL_DIR "The capital of France is"
//! ```
//!
//! Swap `Cpu` for `dsv3_backends::Wgpu` (feature `wgpu`) to run the same code on a GPU.

use std::error::Error;
use std::io::Write;
use std::path::Path;

use deepseek_v3::backends::Cpu;
use deepseek_v3::infer::{generate, GenerateOptions, Tokenizer};
use deepseek_v3::LoadOptions;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: generate MODEL_DIR PROMPT|IDS (e.g. 5,17,200)";
    let dir = args.next().ok_or(usage)?;
    let prompt = args.next().ok_or(usage)?;
    let dir = Path::new(&dir);

    // Weights bind to the module tree by their checkpoint names; bf16/f16/FP8 files are
    // converted while reading the memory-mapped shards.
    let device = Default::default();
    let (model, report) = deepseek_v3::load::<Cpu>(dir, &device, &LoadOptions::default())?;
    eprintln!("loaded {} parameters", report.params);

    let tokenizer = Tokenizer::from_dir(dir)?;
    let ids: Vec<u32> = match (&tokenizer, prompt.split(',').map(str::parse).collect()) {
        (_, Ok(ids)) => ids,
        (Some(t), Err(_)) => t.encode_prompt(&prompt)?,
        (None, Err(_)) => return Err("no tokenizer.json here: give the prompt as ids".into()),
    };

    let opts = GenerateOptions {
        max_new_tokens: 32,
        ..Default::default()
    };
    let mut stdout = std::io::stdout();
    let out = generate(&model, tokenizer.as_ref(), &ids, &opts, |ev| {
        match tokenizer {
            Some(_) => print!("{}", ev.text),
            None => print!("{} ", ev.token),
        }
        let _ = stdout.flush();
    })?;
    println!("\n[{:?}] {:?}", out.stop, out.stats);
    Ok(())
}
