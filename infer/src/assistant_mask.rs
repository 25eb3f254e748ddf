//! The assistant mask of a rendered conversation: which of its tokens the assistant's turns
//! produce (what supervised fine-tuning trains on), as HF's
//! `apply_chat_template(..., return_assistant_tokens_mask=True)` reports it.
//!
//! HF finds the spans through `{% generation %}` markers that a template must carry; most
//! templates (DeepSeek's included) have none. Here they are found from the template as it is:
//! the assistant turn `i` spans from the end of the conversation before it, rendered ready for
//! the assistant (`add_generation_prompt`), to the end of the conversation up to and including
//! it. That span is the turn's content plus whatever the template closes the turn with (the
//! EOS token for DeepSeek), so the model learns to stop. The generation prompt itself (e.g.
//! `<｜Assistant｜>`) is not in the span: at inference the prompt supplies it.
//!
//! It needs the renderings to extend one another token for token; a template (or a tokenizer
//! merging across the boundary) for which they do not gets an error, not a wrong mask.

use crate::error::InferError;
use crate::tokenizer::{Message, Tokenizer};

impl Tokenizer {
    /// The ids of the whole conversation (rendered without a generation prompt) and, per id,
    /// whether an assistant turn produced it.
    ///
    /// # Errors
    /// - [`InferError::ChatTemplate`]: no assistant message; no template; rendering fails (e.g. the
    ///   template's own `raise_exception` for an unknown role); or the rendering before an
    ///   assistant turn is not a token prefix of the rendering after it.
    /// - [`InferError::Tokenizer`]: encoding fails.
    pub fn encode_chat_with_assistant_mask(
        &self,
        messages: &[Message],
    ) -> Result<(Vec<u32>, Vec<bool>), InferError> {
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err(InferError::ChatTemplate(
                "the conversation has no assistant message (nothing to train on)".into(),
            ));
        }
        let ids = self.encode_chat(messages, false)?;
        let mut mask = vec![false; ids.len()];
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.encode_chat(&messages[..i], true)?;
            let upto = self.encode_chat(&messages[..=i], false)?;
            if !upto.starts_with(&before) || !ids.starts_with(&upto) {
                return Err(InferError::ChatTemplate(format!(
                    "message {i} (assistant): the template does not render the conversation \
                     before it as a token prefix of the conversation with it, so its tokens \
                     cannot be located"
                )));
            }
            mask[before.len()..upto.len()].fill(true);
        }
        Ok((ids, mask))
    }
}
