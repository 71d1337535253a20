// A small, safe Markdown renderer for model output. It never parses HTML: the text is split
// into blocks and inline spans by hand and every piece goes into the DOM as a text node, so
// `<script>` or `<img onerror>` in an answer shows up as the characters it is.
// Supported: fenced code blocks (also unterminated, while streaming), `inline code`, **bold**,
// *italic*, headings (#…), bullet and numbered lists, paragraphs. Links stay plain text.

import { h } from './dom.js';

/** Inline spans of one line of text: code first (nothing inside code is formatted), then bold/italic. */
export function inline(text) {
  const out = [];
  const parts = text.split(/(`[^`\n]+`)/);
  for (const p of parts) {
    if (p.length > 2 && p.startsWith('`') && p.endsWith('`')) {
      out.push(h('code', { text: p.slice(1, -1) }));
    } else if (p) {
      out.push(...emphasis(p));
    }
  }
  return out;
}

function emphasis(text) {
  const out = [];
  const re = /\*\*([^*\n]+)\*\*|(?<![\w*])\*([^*\s][^*\n]*?)\*(?![\w*])|__([^_\n]+)__/g;
  let last = 0;
  let m;
  while ((m = re.exec(text))) {
    if (m.index > last) out.push(text.slice(last, m.index));
    if (m[1] !== undefined) out.push(h('strong', { text: m[1] }));
    else if (m[2] !== undefined) out.push(h('em', { text: m[2] }));
    else out.push(h('strong', { text: m[3] }));
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function lines(nodes, textLines) {
  textLines.forEach((l, i) => {
    if (i) nodes.push(h('br'));
    nodes.push(...inline(l));
  });
  return nodes;
}

/** Renders Markdown text into a DocumentFragment. */
export function render(text) {
  const frag = document.createDocumentFragment();
  const src = String(text ?? '').replace(/\r\n?/g, '\n').split('\n');
  let i = 0;
  let para = [];
  const flush = () => {
    if (para.length) frag.append(h('p', {}, lines([], para)));
    para = [];
  };
  while (i < src.length) {
    const line = src[i];
    const fence = /^\s*(```|~~~)\s*([\w+.#-]*)\s*$/.exec(line);
    if (fence) {
      flush();
      const body = [];
      i += 1;
      while (i < src.length && !new RegExp(`^\\s*${fence[1]}\\s*$`).test(src[i])) {
        body.push(src[i]);
        i += 1;
      }
      i += 1; // the closing fence (or the end, while streaming)
      const code = h('code', { text: body.join('\n') });
      if (fence[2]) code.setAttribute('data-lang', fence[2]);
      frag.append(h('pre', { tabindex: '0' }, code));
      continue;
    }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (heading) {
      flush();
      frag.append(h(heading[1].length <= 2 ? 'h3' : 'h4', {}, inline(heading[2])));
      i += 1;
      continue;
    }
    const bullet = /^\s*([-*+]|\d{1,3}[.)])\s+(.*)$/.exec(line);
    if (bullet) {
      flush();
      const ordered = /\d/.test(bullet[1]);
      const list = h(ordered ? 'ol' : 'ul');
      if (ordered && parseInt(bullet[1], 10) !== 1) list.setAttribute('start', String(parseInt(bullet[1], 10)));
      while (i < src.length) {
        const m = /^\s*([-*+]|\d{1,3}[.)])\s+(.*)$/.exec(src[i]);
        if (!m || /\d/.test(m[1]) !== ordered) break;
        list.append(h('li', {}, inline(m[2])));
        i += 1;
      }
      frag.append(list);
      continue;
    }
    if (!line.trim()) {
      flush();
    } else {
      para.push(line);
    }
    i += 1;
  }
  flush();
  return frag;
}
