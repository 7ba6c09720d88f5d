// An answer rendered: its Markdown turned into HTML by marked, then cleaned by DOMPurify of whatever
// could run (scripts, event handlers, javascript: links). A model's output is untrusted text: it
// repeats what it read, and a retrieved document or a pasted page can steer it. Both libraries are
// vendored (VENDORED.md); index.html loads them as classic scripts, which define these globals.
const { marked, DOMPurify } = globalThis;

const CLEAN = {
  USE_PROFILES: { html: true },  // HTML only: no SVG or MathML
  // Nothing loaded without a click: an answer a document steered could send data to any server in an
  // image's URL. No styles or form controls: they could dress an answer up as the page's own.
  FORBID_TAGS: ["img", "picture", "source", "video", "audio", "track", "style", "form", "input", "button",
                "textarea", "select"],
  FORBID_ATTR: ["style"],
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {  // a link opens beside the chat, which keeps its stream
    node.target = "_blank";
    node.rel = "noopener noreferrer";
  }
});

export function renderMarkdown(element, text) {
  // breaks: a single newline is a line break, as chat models write lists and verses
  const html = marked.parse(text, { gfm: true, breaks: true, async: false }).trim();
  element.innerHTML = DOMPurify.sanitize(html, CLEAN);
  for (const code of element.querySelectorAll("pre > code")) code.parentElement.append(copyButton(code));
}

function copyButton(code) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.title = "Copy this code";
  button.addEventListener("click", async () => {
    await copyText(code.textContent);
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return button;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  // a page opened over plain http from another machine has no Clipboard API: copy a selection instead
  const area = document.createElement("textarea");
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}
