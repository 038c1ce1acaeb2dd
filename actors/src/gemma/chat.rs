//! Gemma's chat template: the one place that turns a conversation into the
//! text the model was trained on (`dima generate --chat`, the server's
//! `/v1/chat/completions`).
//!
//! Gemma has no system role: system (and `developer`) messages are put in
//! front of the next user turn, separated by a blank line, as Gemma's own
//! template does.

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

/// The conversation as Gemma's prompt text, ending with the opening of the
/// model's turn (the generation prompt).
pub fn render(messages: &[Message<'_>]) -> String {
    let mut text = String::new();
    let mut system = String::new();
    for m in messages {
        match m.role {
            Role::System => {
                system.push_str(m.content);
                system.push_str("\n\n");
            }
            Role::User => {
                text.push_str("<start_of_turn>user\n");
                text.push_str(&std::mem::take(&mut system));
                text.push_str(m.content);
                text.push_str("<end_of_turn>\n");
            }
            Role::Assistant => {
                text.push_str("<start_of_turn>model\n");
                text.push_str(m.content);
                text.push_str("<end_of_turn>\n");
            }
        }
    }
    text.push_str("<start_of_turn>model\n");
    text
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
