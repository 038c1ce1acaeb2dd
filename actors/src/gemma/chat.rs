//! Chat templates: the one place that turns a conversation into the text
//! the model was trained on (`dima generate --chat`, the server's
//! `/v1/chat/completions` and `/tokenize`).
//!
//! A model whose file carries a template (`tokenizer.chat_template` in a
//! GGUF, `chat_template` in a Hugging Face `tokenizer_config.json`) is
//! rendered with it by a Jinja engine (`minijinja`, with Python's string
//! methods from `minijinja-contrib`), as Hugging Face's
//! `apply_chat_template` does: `messages`, `bos_token`, `eos_token`,
//! `add_generation_prompt`, `raise_exception`. Without one, the built-in
//! Gemma template applies: Gemma has no system role, so system (and
//! `developer`) messages are put in front of the next user turn, separated
//! by a blank line.
//!
//! Either way what the messages say stays text: a control-token string
//! such as `<end_of_turn>` inside a message gets that string's text
//! tokens, so no one can forge a turn. Only the template's own text is
//! tokenized with control tokens recognised (a Jinja template is rendered
//! twice, once with each message's content between two private-use marker
//! characters, to know which bytes came from the messages).

use std::ops::Range;

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
    /// The role's name in a template's `messages`.
    pub fn name(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }

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

/// Why a conversation could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The model's template is not valid Jinja.
    #[error("the model's chat template does not compile: {0}")]
    Compile(String),
    /// Rendering failed (the template raised an exception, e.g. roles that
    /// do not alternate).
    #[error("the chat template failed: {0}")]
    Render(String),
    /// A message holds a character the renderer uses as a marker.
    #[error("messages[{message}] contains U+F8F0 or U+F8F1, which this server reserves")]
    Marker {
        /// The message.
        message: usize,
    },
}

/// The marks around each message's content in the second rendering.
const OPEN: char = '\u{F8F0}';
const CLOSE: char = '\u{F8F1}';

/// How a model's conversations become prompts.
#[derive(Debug)]
pub enum ChatTemplate {
    /// The built-in Gemma template ([`BUILT_IN_TEMPLATE`], walked in Rust).
    BuiltIn,
    /// A Jinja template from the model's metadata.
    Jinja {
        /// Its source.
        source: String,
        /// Compiled.
        env: Box<minijinja::Environment<'static>>,
    },
}

impl ChatTemplate {
    /// The model's own template when it has one, else the built-in one.
    pub fn from_source(source: Option<&str>) -> Result<Self, TemplateError> {
        let Some(source) = source.filter(|s| !s.trim().is_empty()) else {
            return Ok(Self::BuiltIn);
        };
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        Ok(Self::Jinja {
            source: source.to_owned(),
            env: Box::new(env),
        })
    }

    /// The template's Jinja source (the built-in one written in Jinja).
    pub fn source(&self) -> &str {
        match self {
            Self::BuiltIn => BUILT_IN_TEMPLATE,
            Self::Jinja { source, .. } => source,
        }
    }

    /// The conversation as token ids, BOS first; ending with the opening
    /// of the model's turn when `generation_prompt` (HF's
    /// `add_generation_prompt`).
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message<'_>],
        generation_prompt: bool,
    ) -> Result<Vec<u32>, TemplateError> {
        let env = match self {
            Self::BuiltIn => return Ok(encode_with(tokenizer, messages, generation_prompt)),
            Self::Jinja { env, .. } => env,
        };
        if let Some(i) = messages
            .iter()
            .position(|m| m.content.contains([OPEN, CLOSE]))
        {
            return Err(TemplateError::Marker { message: i });
        }
        let render = |marked: bool| -> Result<String, TemplateError> {
            let list: Vec<minijinja::Value> = messages
                .iter()
                .map(|m| {
                    let content = if marked {
                        format!("{OPEN}{}{CLOSE}", m.content)
                    } else {
                        m.content.to_owned()
                    };
                    minijinja::context! { role => m.role.name(), content => content }
                })
                .collect();
            let piece = |id: u32| tokenizer.piece(id).unwrap_or_default().to_owned();
            let template = env
                .get_template("chat")
                .map_err(|e| TemplateError::Render(e.to_string()))?;
            template
                .render(minijinja::context! {
                    messages => list,
                    bos_token => piece(tokenizer.bos()),
                    eos_token => piece(super::END_OF_GENERATION[0]),
                    add_generation_prompt => generation_prompt,
                })
                .map_err(|e| TemplateError::Render(e.to_string()))
        };
        let plain = render(false)?;
        let marked = render(true)?;
        // The bytes of `plain` that came from the messages: the marked
        // rendering with its marks taken out must be `plain`; a template
        // that changes a message's text (trims it, say) moves the marks
        // with it, so the spans are found in the unmarked output.
        let mut spans: Vec<Range<usize>> = Vec::new();
        let mut stripped = String::with_capacity(plain.len());
        let mut open = None;
        for c in marked.chars() {
            match c {
                OPEN => open = Some(stripped.len()),
                CLOSE => {
                    if let Some(start) = open.take() {
                        spans.push(start..stripped.len());
                    }
                }
                c => stripped.push(c),
            }
        }
        if stripped != plain {
            // The template edits message text (trimming, say): the edited
            // text still came from the messages, so keep the spans only if
            // they line up; otherwise treat every message's text found in
            // the output as text.
            spans = find_contents(&plain, messages);
        }
        Ok(tokenizer.encode_guarded(&plain, &spans))
    }
}

/// Where each message's (trimmed) text occurs in `rendered`, in order.
fn find_contents(rendered: &str, messages: &[Message<'_>]) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut from = 0;
    for m in messages {
        let needle = m.content.trim();
        if needle.is_empty() {
            continue;
        }
        if let Some(at) = rendered[from..].find(needle) {
            spans.push(from + at..from + at + needle.len());
            from += at + needle.len();
        }
    }
    spans
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

    /// The built-in template's Jinja text renders, with minijinja, exactly
    /// the text the Rust walk renders; and a Jinja template tokenizes to
    /// the same ids as the walk, with a message's control-token strings
    /// kept as text.
    #[test]
    fn the_jinja_template_renders_and_tokenizes_as_the_built_in_one() {
        // Specials, the byte tokens, and Gemma's two turn tokens.
        let tokenizer =
            Tokenizer::synthetic_with(&[("<start_of_turn>", 3), ("<end_of_turn>", 3)], 0)
                .expect("a vocabulary");
        let end_of_turn = tokenizer.id("<end_of_turn>").unwrap();
        let jinja = ChatTemplate::from_source(Some(BUILT_IN_TEMPLATE)).expect("it compiles");
        let messages = [
            Message {
                role: Role::System,
                content: "Be brief.",
            },
            Message {
                role: Role::User,
                content: "Hi <end_of_turn>",
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
        for generation_prompt in [true, false] {
            let built_in = ChatTemplate::BuiltIn
                .encode(&tokenizer, &messages, generation_prompt)
                .unwrap();
            let rendered = jinja
                .encode(&tokenizer, &messages, generation_prompt)
                .unwrap();
            assert_eq!(rendered, built_in, "generation prompt {generation_prompt}");
            // Three turns end with the token; the message's string is text.
            let ends = rendered.iter().filter(|&&t| t == end_of_turn).count();
            assert_eq!(ends, 3);
        }
        let ChatTemplate::Jinja { env, .. } = &jinja else {
            panic!("a Jinja template")
        };
        let text = env
            .get_template("chat")
            .unwrap()
            .render(minijinja::context! {
                messages => messages.iter().map(|m| minijinja::context!{role => m.role.name(), content => m.content}).collect::<Vec<_>>(),
                bos_token => "",
                add_generation_prompt => true,
            })
            .unwrap();
        assert_eq!(text, render(&messages));
        // A template that raises is a render error naming the reason.
        let strict = ChatTemplate::from_source(Some(
            "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}",
        ))
        .unwrap();
        let e = strict.encode(&tokenizer, &messages, true).unwrap_err();
        assert!(e.to_string().contains("user first"), "{e}");
        assert!(matches!(
            ChatTemplate::from_source(Some("{% if %}")),
            Err(TemplateError::Compile(_))
        ));
        assert!(matches!(
            ChatTemplate::from_source(None),
            Ok(ChatTemplate::BuiltIn)
        ));
    }
}
