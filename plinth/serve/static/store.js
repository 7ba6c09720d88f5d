// Conversations kept in this browser's localStorage, one key each, so that a turn rewrites only its
// own conversation. A conversation is { id, title (null until renamed), system, model, messages,
// updated }; its messages are what the page sends to /v1/chat/completions (a user turn with images
// keeps its content parts), and an image generator's answers are { role: "assistant", images }.
const PREFIX = "plinth-chat:";
const CURRENT = "plinth-current-chat";

export function newConversation(model, system = "") {
  // not crypto.randomUUID: a page opened over plain http from another machine does not have it
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  return { id, title: null, system, model, messages: [], updated: Date.now() };
}

export function listConversations() {  // the most recently updated first
  const found = [];
  for (let i = 0; i < localStorage.length; i++) {
    const key = localStorage.key(i);
    if (key.startsWith(PREFIX)) found.push(JSON.parse(localStorage.getItem(key)));
  }
  return found.sort((a, b) => b.updated - a.updated);
}

export function loadConversation(id) {
  const text = id && localStorage.getItem(PREFIX + id);
  return text ? JSON.parse(text) : null;
}

export function saveConversation(conversation) {  // throws QuotaExceededError when the storage is full
  conversation.updated = Date.now();
  localStorage.setItem(PREFIX + conversation.id, JSON.stringify(conversation));
}

export function deleteConversation(id) {
  localStorage.removeItem(PREFIX + id);
}

export const currentId = () => localStorage.getItem(CURRENT);
export const setCurrentId = (id) => localStorage.setItem(CURRENT, id);

export function titleOf(conversation) {
  if (conversation.title) return conversation.title;
  const first = conversation.messages.find((m) => m.role === "user");
  if (!first) return "New chat";
  const text = typeof first.content === "string" ? first.content
    : first.content.filter((part) => part.type === "text").map((part) => part.text).join(" ");
  return text.trim().slice(0, 60) || (typeof first.content === "string" ? "(no prompt)" : "(image)");
}
