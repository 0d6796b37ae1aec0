#include "inference/chat.hpp"

#include "core/error.hpp"

namespace hybrit {

void drop_reply_space(std::string& text, bool& at_start) {
  if (!at_start || text.empty()) return;
  if (text[0] == ' ') text.erase(0, 1);
  at_start = text.empty();
}

std::string chat_prompt(const std::vector<ChatMessage>& messages) {
  if (messages.empty()) fail_field("messages", "empty (give at least one message)");
  std::string prompt;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "system") {
      if (i != 0) fail_field("messages", "messages[", i, "]: a system message may only come first");
      prompt += m.content + "\n\n";
    } else if (m.role == "user") {
      prompt += kChatUserPrefix + m.content + "\n";
    } else if (m.role == "assistant") {
      prompt += std::string(kChatAssistantPrefix) + " " + m.content + "\n";
    } else {
      fail_field("messages", "messages[", i, "].role: expected system, user or assistant, got '", shortened(m.role), "'");
    }
  }
  return prompt + kChatAssistantPrefix;
}

}  // namespace hybrit
