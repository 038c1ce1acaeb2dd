//! One choice of an answer as its tokens arrive: the decoded text, stop
//! strings, and the log-probabilities in OpenAI's two shapes.
//!
//! Stop strings are matched on the decoded text, so a stop string split
//! across tokens is found. Text that could still be the start of a stop
//! string is held back (not streamed) until the next tokens show it is not;
//! the stop string itself is never returned. End-of-generation tokens and
//! `stop_token_ids` end the choice and add no text.

use serde_json::{Value, json};

use crate::gemma::TokenLogprob;
use crate::tokenizer::Tokenizer;

/// A token of the answer, where its text starts, and its log-probability.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    /// The token.
    pub id: u32,
    /// Characters of the text before this token's.
    pub offset: usize,
    /// Its log-probability, when asked for (`None` for a prompt's first
    /// token).
    pub logprob: Option<TokenLogprob>,
}

/// A choice being answered.
#[derive(Debug)]
pub struct Choice {
    /// Its index in the answer.
    pub index: usize,
    /// The text so far (the final text once finished).
    pub text: String,
    /// Its tokens (those that show text), with their log-probabilities.
    pub pieces: Vec<Piece>,
    /// Why it ended, once it has.
    pub finish: Option<&'static str>,
    /// Tokens generated, hidden ones included (the usage count).
    pub generated: usize,
    /// Bytes of a character not yet complete.
    pending: Vec<u8>,
    /// Characters in `text`.
    chars: usize,
    /// `text[..safe]` can no longer change.
    safe: usize,
    /// `text[..sent]` and `pieces[..pieces_sent]` were streamed.
    sent: usize,
    pieces_sent: usize,
}

/// What a stream may send of a choice now.
#[derive(Debug, PartialEq)]
pub struct Delta {
    /// New text.
    pub text: String,
    /// The tokens of that text.
    pub pieces: Vec<Piece>,
    /// Set once, with the choice's last delta.
    pub finish: Option<&'static str>,
}

impl Choice {
    /// An empty choice.
    pub fn new(index: usize) -> Self {
        Self {
            index,
            text: String::new(),
            pieces: Vec::new(),
            finish: None,
            generated: 0,
            pending: Vec::new(),
            chars: 0,
            safe: 0,
            sent: 0,
            pieces_sent: 0,
        }
    }

    /// Adds a generated token; `false` when a stop string ended the choice
    /// (the engine is then told to stop it).
    pub fn token(
        &mut self,
        tokenizer: &Tokenizer,
        id: u32,
        logprob: Option<TokenLogprob>,
        stop: &[String],
        hidden: &[u32],
    ) -> bool {
        if self.finish.is_some() {
            return false;
        }
        self.generated += 1;
        if hidden.contains(&id) {
            return true;
        }
        self.pieces.push(Piece {
            id,
            offset: self.chars,
            logprob,
        });
        self.pending.extend(tokenizer.piece_bytes(id, false));
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        if valid > 0 {
            let done = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
            self.pending.drain(..valid);
            self.push_text(&done);
        }
        !self.check_stops(stop, false)
    }

    /// The engine ended the choice (`"stop"`: end of generation or a stop
    /// token; `"length"`).
    pub fn end(&mut self, reason: &'static str, stop: &[String]) {
        if self.finish.is_some() {
            return;
        }
        if !self.pending.is_empty() {
            let rest = String::from_utf8_lossy(&self.pending).into_owned();
            self.pending.clear();
            self.push_text(&rest);
        }
        if !self.check_stops(stop, true) {
            self.finish = Some(reason);
        }
    }

    fn push_text(&mut self, text: &str) {
        self.chars += text.chars().count();
        self.text.push_str(text);
    }

    /// Looks for a stop string in the text not yet final; on a match cuts
    /// the text there and finishes (`true`). Otherwise moves the final mark
    /// up to what cannot start a stop string (all of it when `last`).
    fn check_stops(&mut self, stop: &[String], last: bool) -> bool {
        let from = self.safe;
        let found = stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|at| from + at))
            .min();
        if let Some(at) = found {
            self.text.truncate(at);
            self.chars = self.text.chars().count();
            let chars = self.chars;
            self.pieces.retain(|p| p.offset < chars);
            self.safe = at;
            self.finish = Some("stop");
            return true;
        }
        let hold = if last {
            0
        } else {
            held_back(&self.text[from..], stop)
        };
        self.safe = self.text.len() - hold;
        false
    }

    /// What is new and final since the last call (streaming).
    pub fn delta(&mut self) -> Delta {
        let end = if self.finish.is_some() {
            self.text.len()
        } else {
            self.safe
        };
        let text = self.text[self.sent.min(end)..end].to_owned();
        self.sent = end;
        let final_chars = self.text[..end].chars().count();
        let mut pieces = Vec::new();
        while let Some(p) = self.pieces.get(self.pieces_sent) {
            if self.finish.is_none() && p.offset >= final_chars {
                break;
            }
            pieces.push(p.clone());
            self.pieces_sent += 1;
        }
        Delta {
            text,
            pieces,
            finish: self.finish,
        }
    }
}

/// Bytes at the end of `text` that are the start of some stop string (and
/// so may not be shown yet).
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut hold = 0;
    for s in stop {
        let most = (s.len() - 1).min(text.len());
        for k in (hold + 1..=most).rev() {
            if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                hold = k;
                break;
            }
        }
    }
    hold
}

/// A token's text for a log-probability listing.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(&tokenizer.piece_bytes(id, false)).into_owned()
}

/// How tokens are named in log-probability listings: by their text, or
/// (vLLM's `return_tokens_as_token_ids`) as `token_id:<id>`.
#[derive(Clone, Copy, Debug)]
pub struct Names<'a> {
    /// The vocabulary.
    pub tokenizer: &'a Tokenizer,
    /// Name tokens by id.
    pub as_ids: bool,
}

impl Names<'_> {
    fn name(&self, id: u32) -> String {
        if self.as_ids {
            format!("token_id:{id}")
        } else {
            token_text(self.tokenizer, id)
        }
    }
}

/// `/v1/completions`' `logprobs` object (`tokens`, `token_logprobs`,
/// `top_logprobs`, `text_offset`) of `pieces`, offsets moved by `shift`.
pub fn completion_logprobs(names: Names<'_>, pieces: &[Piece], shift: usize) -> Value {
    let mut tokens = Vec::with_capacity(pieces.len());
    let mut token_logprobs = Vec::with_capacity(pieces.len());
    let mut top_logprobs = Vec::with_capacity(pieces.len());
    let mut text_offset = Vec::with_capacity(pieces.len());
    for p in pieces {
        tokens.push(Value::String(names.name(p.id)));
        text_offset.push(json!(p.offset + shift));
        match &p.logprob {
            None => {
                token_logprobs.push(Value::Null);
                top_logprobs.push(Value::Null);
            }
            Some(lp) => {
                token_logprobs.push(json!(lp.logprob));
                let mut top = serde_json::Map::new();
                for (id, l) in &lp.top {
                    top.entry(names.name(*id)).or_insert(json!(l));
                }
                // The chosen token is always listed (as OpenAI does).
                top.entry(names.name(p.id)).or_insert(json!(lp.logprob));
                top_logprobs.push(Value::Object(top));
            }
        }
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}

/// `/v1/chat/completions`' `logprobs` object (`content`: per token its
/// `token`, `logprob`, `bytes` and `top_logprobs`).
pub fn chat_logprobs(names: Names<'_>, pieces: &[Piece]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let bytes = names.tokenizer.piece_bytes(id, false);
        json!({
            "token": names.name(id),
            "logprob": logprob,
            "bytes": bytes,
        })
    };
    let content: Vec<Value> = pieces
        .iter()
        .filter_map(|p| {
            let lp = p.logprob.as_ref()?;
            let mut e = entry(p.id, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
            Some(e)
        })
        .collect();
    json!({"content": content, "refusal": null})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first id of [`vocab`]'s own pieces (after the specials and the
    /// 256 byte tokens).
    const BASE: u32 = 260;

    /// A vocabulary with the given pieces at ids `BASE..`.
    fn vocab(own: &[&str]) -> Tokenizer {
        let normal: Vec<(&str, i32)> = own.iter().map(|p| (*p, 1)).collect();
        Tokenizer::synthetic_with(&normal, 0).expect("a vocabulary")
    }

    /// Feeds `ids` (indices into [`vocab`]'s pieces) one by one; the
    /// streamed text, chunk by chunk, and the choice.
    fn run(tok: &Tokenizer, ids: &[u32], stop: &[&str], end: bool) -> (Vec<String>, Choice) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut c = Choice::new(0);
        let mut chunks = Vec::new();
        for &id in ids {
            let goes_on = c.token(tok, BASE + id, None, &stop, &[]);
            chunks.push(c.delta().text);
            if !goes_on {
                return (chunks, c);
            }
        }
        if end {
            c.end("length", &stop);
            chunks.push(c.delta().text);
        }
        (chunks, c)
    }

    #[test]
    fn a_stop_string_split_across_tokens_is_found_and_never_shown() {
        let tok = vocab(&["Hel", "lo", " wo", "rld", "\n", "\nQ", ":"]);
        // "Hello world\nQ:" with stop "\nQ:" split over "\nQ" and ":".
        let (chunks, c) = run(&tok, &[0, 1, 2, 3, 5, 6], &["\nQ:"], true);
        assert_eq!(c.text, "Hello world");
        assert_eq!(c.finish, Some("stop"));
        assert_eq!(chunks.concat(), "Hello world");
        // "\nQ" was held back: it could have been the stop string's start.
        assert_eq!(chunks[4], "");
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        let tok = vocab(&["a", "\n", "b"]);
        let (chunks, c) = run(&tok, &[0, 1, 2], &["\nQ:"], true);
        assert_eq!(chunks, ["a", "", "\nb", ""]);
        assert_eq!((c.text.as_str(), c.finish), ("a\nb", Some("length")));
        // Held back at the end: a length cut shows it.
        let (chunks, c) = run(&tok, &[0, 1], &["\nQ:"], true);
        assert_eq!(chunks.concat(), "a\n");
        assert_eq!(c.finish, Some("length"));
    }

    #[test]
    fn stop_edge_cases() {
        let tok = vocab(&["ab", "cd", "x", "STOP", "S"]);
        // In the first token.
        let (_, c) = run(&tok, &[3, 0], &["STOP"], true);
        assert_eq!(
            (c.text.as_str(), c.finish, c.generated),
            ("", Some("stop"), 1)
        );
        // Several stop strings: the earliest match wins.
        let (_, c) = run(&tok, &[0, 1, 2], &["x", "bc"], true);
        assert_eq!(c.text, "a");
        // A stop string that starts inside held-back text ("ab" held as a
        // start of "abz"? no: "b" then "cd" completes "bcd").
        let (chunks, c) = run(&tok, &[0, 1], &["bcd", "abz"], true);
        assert_eq!((c.text.as_str(), chunks.concat()), ("a", "a".into()));
        // A stop string longer than the output: everything is shown.
        let (_, c) = run(&tok, &[0, 4], &["abSTOPPED"], true);
        assert_eq!((c.text.as_str(), c.finish), ("abS", Some("length")));
        // The pieces inside the stop string are dropped.
        let (_, c) = run(&tok, &[0, 1, 2], &["cdx"], true);
        assert_eq!(c.pieces.iter().map(|p| p.id).collect::<Vec<_>>(), [BASE]);
    }

    #[test]
    fn hidden_tokens_count_but_show_nothing() {
        let tok = vocab(&["a", "end"]);
        let mut c = Choice::new(0);
        assert!(c.token(&tok, BASE, None, &[], &[BASE + 1]));
        assert!(c.token(&tok, BASE + 1, None, &[], &[BASE + 1]));
        c.end("stop", &[]);
        assert_eq!((c.text.as_str(), c.generated, c.pieces.len()), ("a", 2, 1));
    }

    #[test]
    fn characters_split_over_tokens_are_whole_and_offsets_count_characters() {
        // "é" is two bytes; byte tokens split it.
        let tok = vocab(&["x"]);
        let mut c = Choice::new(0);
        let stop: Vec<String> = Vec::new();
        for id in [BASE, 4 + 0xC3, 4 + 0xA9, BASE] {
            c.token(&tok, id, None, &stop, &[]);
        }
        c.end("length", &stop);
        assert_eq!(c.text, "xéx");
        let offsets: Vec<usize> = c.pieces.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [0, 1, 1, 2]);
    }
}
