//! Gemma's chat template: the one place that turns a conversation into the
//! text the model was trained on (`dima generate --chat`, the server's
//! `/v1/chat/completions`).
//!
//! Gemma has no system role: system (and `developer`) messages are put in
//! front of the next user turn, separated by a blank line, as Gemma's own
//! template does.

use crate::tokenizer::Tokenizer;

/// The built-in template written in Jinja: what `GET /tokenizer_info`
/// reports for a model whose file carries no template of its own. It
/// renders exactly [`render`]'s text (a test checks it with `minijinja`).
pub const BUILT_IN_TEMPLATE: &str = concat!(
    "{{- bos_token -}}",
    "{%- set ns = namespace(system='') -%}",
    "{%- for m in messages -%}",
    "{%- if m.role == 'system' or m.role == 'developer' -%}",
    "{%- set ns.system = ns.system + m.content + '\\n\\n' -%}",
    "{%- elif m.role == 'user' -%}",
    "{{- '<start_of_turn>user\\n' + ns.system + m.content + '<end_of_turn>\\n' -}}",
    "{%- set ns.system = '' -%}",
    "{%- elif m.role == 'assistant' -%}",
    "{{- '<start_of_turn>model\\n' + m.content + '<end_of_turn>\\n' -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}",
);

/// Who said a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Instructions, folded into the next user turn.
    System,
    /// The user.
    User,
    /// The model (a turn of an earlier answer).
    Assistant,
}

impl Role {
    /// The OpenAI role name (`system`, `developer`, `user`, `assistant`),
    /// or `None` for any other.
    pub fn from_openai(name: &str) -> Option<Self> {
        match name {
            "system" | "developer" => Some(Self::System),
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            _ => None,
        }
    }
}

/// One message of a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: &'a str,
}

/// A piece of the rendered conversation: a control token the template
/// puts there, or text.
enum Piece<'a> {
    Control(&'static str),
    Text(&'a str),
}

/// Walks the template: `emit` gets each piece in order; the opening of the
/// model's turn last when `generation_prompt`.
fn walk<'a>(messages: &[Message<'a>], generation_prompt: bool, mut emit: impl FnMut(Piece<'a>)) {
    let mut system: Vec<&'a str> = Vec::new();
    for m in messages {
        match m.role {
            Role::System => system.push(m.content),
            Role::User => {
                emit(Piece::Control("<start_of_turn>"));
                emit(Piece::Text("user\n"));
                for s in system.drain(..) {
                    emit(Piece::Text(s));
                    emit(Piece::Text("\n\n"));
                }
                emit(Piece::Text(m.content));
                emit(Piece::Control("<end_of_turn>"));
                emit(Piece::Text("\n"));
            }
            Role::Assistant => {
                emit(Piece::Control("<start_of_turn>"));
                emit(Piece::Text("model\n"));
                emit(Piece::Text(m.content));
                emit(Piece::Control("<end_of_turn>"));
                emit(Piece::Text("\n"));
            }
        }
    }
    if generation_prompt {
        emit(Piece::Control("<start_of_turn>"));
        emit(Piece::Text("model\n"));
    }
}

/// The conversation as Gemma's prompt text, ending with the opening of the
/// model's turn (the generation prompt).
pub fn render(messages: &[Message<'_>]) -> String {
    let mut text = String::new();
    walk(messages, true, |piece| match piece {
        Piece::Control(token) => text.push_str(token),
        Piece::Text(t) => text.push_str(t),
    });
    text
}

/// The conversation as token ids, BOS first: the template's control tokens
/// are tokens, and everything the messages say is text. A message that
/// contains `<end_of_turn>` or any other control-token string gets that
/// string's text tokens, so no one can forge a turn. For messages without
/// such strings the ids are those of [`render`]'s text tokenized with
/// special tokens parsed.
pub fn encode(tokenizer: &Tokenizer, messages: &[Message<'_>]) -> Vec<u32> {
    encode_with(tokenizer, messages, true)
}

/// [`encode`], ending with the opening of the model's turn only when
/// `generation_prompt` (HF's `add_generation_prompt`).
pub fn encode_with(
    tokenizer: &Tokenizer,
    messages: &[Message<'_>],
    generation_prompt: bool,
) -> Vec<u32> {
    let mut ids = tokenizer.encode("", true, false);
    let mut text = String::new();
    walk(messages, generation_prompt, |piece| match piece {
        Piece::Text(t) => text.push_str(t),
        Piece::Control(token) => {
            ids.extend(tokenizer.encode(&std::mem::take(&mut text), false, false));
            match tokenizer.id(token) {
                Some(id) => ids.push(id),
                // A vocabulary without Gemma's turn tokens: their text.
                None => ids.extend(tokenizer.encode(token, false, false)),
            }
        }
    });
    ids.extend(tokenizer.encode(&text, false, false));
    ids
}

/// One user turn, then the model's turn.
pub fn user_turn(prompt: &str) -> String {
    render(&[Message {
        role: Role::User,
        content: prompt,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_turn_opens_the_models_turn() {
        assert_eq!(
            user_turn("Hi"),
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn system_messages_join_the_next_user_turn() {
        let messages = [
            Message {
                role: Role::System,
                content: "Be brief.",
            },
            Message {
                role: Role::User,
                content: "Hi",
            },
            Message {
                role: Role::Assistant,
                content: "Hello.",
            },
            Message {
                role: Role::User,
                content: "Bye",
            },
        ];
        assert_eq!(
            render(&messages),
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(Role::from_openai("developer"), Some(Role::System));
        assert_eq!(Role::from_openai("tool"), None);
    }
}
