//! DeepSeek-V3 inference on Burn: latent KV cache, on-device sampling, tokenizer and chat
//! template (with the assistant mask fine-tuning needs), streaming generation, batching, and MTP
//! speculative decoding.
//!
//! ```no_run
//! use dsv3_infer::{generate, GenerateOptions, Tokenizer};
//! # fn f(model: &dsv3_model::DeepseekV3<burn::backend::Flex>) -> Result<(), dsv3_infer::InferError> {
//! let dir = std::path::Path::new("model-dir");
//! let tok = Tokenizer::from_dir(dir)?;                 // None without tokenizer.json
//! let prompt = match &tok {
//!     Some(t) => t.encode_prompt("The capital of France is")?,
//!     None => vec![0, 15, 7],
//! };
//! let out = generate(model, tok.as_ref(), &prompt, &GenerateOptions::default(), |ev| {
//!     print!("{}", ev.text);                          // streamed, UTF-8 safe
//! })?;
//! println!("\n{:?} {:?}", out.tokens, out.stop);
//! # Ok(()) }
//! ```

mod assistant_mask;
mod cache;
mod error;
mod generate;
mod sampling;
mod session;
mod tokenizer;

pub use cache::LatentCache;
pub use error::InferError;
pub use generate::{
    continue_session, generate, generate_batch, GenerateOptions, Generation, Speculative,
    SpeculativeStats, Stats, StopReason, TokenEvent,
};
pub use sampling::{Sampler, SamplingOptions};
pub use session::{Session, SessionOptions};
pub use tokenizer::{Message, StreamDecoder, Tokenizer, CHAT_TEMPLATE_FILE};
