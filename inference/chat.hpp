// Chat for models trained on plain text: a conversation becomes one prompt through a fixed,
// documented template, and the reply ends where the model starts the user's next turn.
//
//   <system text>\n\n            (when there is a system message)
//   User: <text>\n
//   Assistant: <text>\n           (earlier replies)
//   ...
//   Assistant:                    (the model continues from here)
//
// Shared by `POST /v1/chat/completions` and `hybrit generate --interactive --chat`.
#pragma once
#include <string>
#include <vector>

namespace hybrit {

struct ChatMessage {
  std::string role;  // system | user | assistant
  std::string content;
};

inline constexpr const char* kChatUserPrefix = "User: ";
inline constexpr const char* kChatAssistantPrefix = "Assistant:";
// The reply stops before these (the model writing the user's next turn).
inline const std::vector<std::string>& chat_stop_strings() {
  static const std::vector<std::string> stops = {"\nUser:"};
  return stops;
}

// The template ends with "Assistant:"; the model's reply starts with the space after it, which the
// reply drops. For text arriving in pieces: `at_start` says no character has been kept yet, and is
// updated.
void drop_reply_space(std::string& text, bool& at_start);

// The prompt for the assistant's next reply. Errors (ErrorKind::invalid_argument, field
// "messages"): no messages, an unknown role, a system message after the first.
std::string chat_prompt(const std::vector<ChatMessage>& messages);

}  // namespace hybrit
