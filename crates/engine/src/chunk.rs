//! A fast path for the OpenAI stream chunks an upstream sends: most chunks carry one choice
//! with a short piece of text and some fields the node ignores (`id`, `created`, `model`…).
//! Deserializing them with serde was the node's largest user-space item (~14 % of its CPU when
//! proxying a canned 11-chunk stream), most of it matching and skipping the ignored fields: on
//! the benchmark's chunk, 351–367 ns with serde, 170 ns here (one thread, a loop of 2M).
//!
//! [`scan`] validates the whole payload as JSON in one pass and reads the few fields it needs.
//! It answers only for chunks whose outcome it is sure of: strings without escapes, `usage` and
//! `error` null or absent, every field the node reads of the type it expects, no field read
//! twice. For anything else it answers `None`, and the caller parses with serde as before, so
//! the result is serde's in every case (a property test checks that against serde's typed
//! parse).

use std::borrow::Cow;

use lattice_api::Usage;
use serde::Deserialize;

/// What the node reads of a chunk: its first choice's text (chat `delta.content`, else
/// completions `text`) and finish reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fields<'a> {
    pub(crate) text: Option<&'a str>,
    pub(crate) finish: Option<&'a str>,
}

/// The fields of an OpenAI stream chunk the node reads; strings borrowed from the payload.
#[derive(Deserialize)]
pub(crate) struct Chunk<'a> {
    #[serde(borrow, default)]
    pub(crate) choices: Option<Vec<ChunkChoice<'a>>>,
    #[serde(default)]
    pub(crate) usage: Option<Usage>,
    #[serde(borrow, default)]
    pub(crate) error: Option<ChunkError<'a>>,
}

#[derive(Deserialize)]
pub(crate) struct ChunkChoice<'a> {
    #[serde(borrow, default)]
    pub(crate) delta: Option<ChunkDelta<'a>>,
    #[serde(borrow, default)]
    pub(crate) text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
pub(crate) struct ChunkDelta<'a> {
    #[serde(borrow, default)]
    pub(crate) content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
pub(crate) struct ChunkError<'a> {
    #[serde(borrow, default)]
    pub(crate) message: Option<Cow<'a, str>>,
}

impl Chunk<'_> {
    /// Its first choice's text (chat `delta.content`, else completions `text`) and finish
    /// reason.
    pub(crate) fn fields(&self) -> Fields<'_> {
        let choice = self.choices.as_deref().and_then(<[_]>::first);
        Fields {
            text: choice.and_then(|ch| {
                ch.delta
                    .as_ref()
                    .and_then(|d| d.content.as_deref())
                    .or(ch.text.as_deref())
            }),
            finish: choice.and_then(|ch| ch.finish_reason.as_deref()),
        }
    }
}

/// Nesting deeper than this is left to serde (whose own limit is 128).
const MAX_DEPTH: u32 = 32;

/// The chunk's fields, if `payload` is a chunk the fast path is sure of (see the module).
pub(crate) fn scan(payload: &str) -> Option<Fields<'_>> {
    let mut s = Scan {
        src: payload,
        b: payload.as_bytes(),
        i: 0,
    };
    s.ws();
    let fields = s.chunk()?;
    s.ws();
    (s.i == s.b.len()).then_some(fields)
}

/// A cursor over the payload; every method answers `None` when the fast path gives up.
struct Scan<'a> {
    src: &'a str,
    b: &'a [u8],
    i: usize,
}

/// A choice's fields: `delta.content`, `text`, `finish_reason`.
type Choice<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>);

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i.checked_add(word.len())?;
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A string without escapes or control characters (those go to serde).
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.i;
        // Chunk strings are short: a plain loop beats `memchr` plus a second pass.
        let len = self
            .b
            .get(start..)?
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
        if self.b.get(start + len) != Some(&b'"') {
            return None;
        }
        self.i = start + len + 1;
        // Both ends are at ASCII quotes, so on character boundaries.
        self.src.get(start..start + len)
    }

    /// `null` (as `None`) or a string.
    fn null_or_string(&mut self) -> Option<Option<&'a str>> {
        if self.peek() == Some(b'n') {
            self.literal(b"null")?;
            return Some(None);
        }
        self.string().map(Some)
    }

    /// The members of an object, calling `member` with each key after its `:` and whitespace.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.seq(b'{', b'}', |s| {
            let key = s.string()?;
            s.ws();
            s.expect(b':')?;
            s.ws();
            member(s, key)
        })
    }

    /// The elements of an array, calling `element` at each.
    fn array(&mut self, element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.seq(b'[', b']', element)
    }

    /// `open`, then `item`s separated by commas (whitespace around each), then `close`.
    fn seq(
        &mut self,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        self.expect(open)?;
        self.ws();
        if self.eat(close) {
            return Some(());
        }
        loop {
            self.ws();
            item(self)?;
            self.ws();
            if self.eat(close) {
                return Some(());
            }
            self.expect(b',')?;
        }
    }

    /// Any JSON value, checked and ignored.
    fn skip(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(|s, _| s.skip(depth + 1)),
            b'[' => self.array(|s| s.skip(depth + 1)),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.') {
            self.some_digits()?;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.i;
        self.digits();
        (self.i > start).then_some(())
    }

    /// Sets `slot` once: a field read twice is an error for serde.
    fn once<T>(slot: &mut Option<T>, v: T) -> Option<()> {
        slot.is_none().then(|| *slot = Some(v))
    }

    fn chunk(&mut self) -> Option<Fields<'a>> {
        let mut choices: Option<Option<Choice<'a>>> = None;
        let (mut usage, mut error) = (None, None);
        self.object(|s, key| match key {
            "choices" => Self::once(&mut choices, s.choices()?),
            // Only null: a usage or an error is left to serde.
            "usage" => Self::once(&mut usage, s.literal(b"null")?),
            "error" => Self::once(&mut error, s.literal(b"null")?),
            _ => s.skip(1),
        })?;
        let (content, text, finish) = choices.flatten().unwrap_or_default();
        Some(Fields {
            text: content.or(text),
            finish,
        })
    }

    /// `null` or an array of choices: the first one's fields (`None` for `null` or `[]`).
    fn choices(&mut self) -> Option<Option<Choice<'a>>> {
        if self.peek() == Some(b'n') {
            self.literal(b"null")?;
            return Some(None);
        }
        let mut first = None;
        self.array(|s| {
            let c = s.choice()?;
            first.get_or_insert(c);
            Some(())
        })?;
        Some(first)
    }

    fn choice(&mut self) -> Option<Choice<'a>> {
        let (mut delta, mut text, mut finish) = (None, None, None);
        self.object(|s, key| match key {
            "delta" => Self::once(&mut delta, s.delta()?),
            "text" => Self::once(&mut text, s.null_or_string()?),
            "finish_reason" => Self::once(&mut finish, s.null_or_string()?),
            _ => s.skip(2),
        })?;
        Some((delta.flatten(), text.flatten(), finish.flatten()))
    }

    /// `null` or a delta object: its `content`.
    fn delta(&mut self) -> Option<Option<&'a str>> {
        if self.peek() == Some(b'n') {
            self.literal(b"null")?;
            return Some(None);
        }
        let mut content = None;
        self.object(|s, key| match key {
            "content" => Self::once(&mut content, s.null_or_string()?),
            _ => s.skip(3),
        })?;
        Some(content.flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Serde's typed parse, as `Translate::feed` does it first: the fields, and whether the
    /// chunk had a usage or an error object.
    fn typed(payload: &str) -> Option<(Option<String>, Option<String>, bool, bool)> {
        let c: Chunk<'_> = serde_json::from_str(payload).ok()?;
        let f = c.fields();
        Some((
            f.text.map(str::to_owned),
            f.finish.map(str::to_owned),
            c.usage.is_some(),
            c.error.is_some(),
        ))
    }

    /// Whenever the fast path answers, serde's typed parse succeeds with the same fields and
    /// neither a usage nor an error.
    fn agrees(payload: &str) {
        if let Some(f) = scan(payload) {
            let want = (
                f.text.map(str::to_owned),
                f.finish.map(str::to_owned),
                false,
                false,
            );
            assert_eq!(typed(payload), Some(want), "payload {payload:?}");
        }
    }

    #[test]
    fn usual_chunks_take_the_fast_path() {
        let cases = [
            (
                r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m","system_fingerprint":null,"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"logprobs":null,"finish_reason":null}]}"#,
                Some("Hel"),
                None,
            ),
            (
                r#"{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,"model":"bench-model","choices":[{"index":0,"delta":{"content":"lo"},"text":"lo","logprobs":null,"finish_reason":null}]}"#,
                Some("lo"),
                None,
            ),
            (
                r#"{"id":"c","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}],"usage":null}"#,
                None,
                Some("length"),
            ),
            (
                r#" { "id" : "cmpl-2" , "object" : "text_completion" , "created" : -1.5e+3 , "choices" : [ { "text" : "日本 🦀" , "index" : 0 , "logprobs" : { "tokens" : [ "a" , 1 , true , [ ] , { } ] } , "finish_reason" : "stop" } ] } "#,
                Some("日本 🦀"),
                Some("stop"),
            ),
            (
                r#"{"choices":[{"delta":null,"text":null,"finish_reason":null},{"delta":{"content":"second"}}]}"#,
                None,
                None,
            ),
            (r#"{"choices":null,"error":null}"#, None, None),
        ];
        for (payload, text, finish) in cases {
            assert_eq!(scan(payload), Some(Fields { text, finish }), "{payload}");
            agrees(payload);
        }
    }

    #[test]
    fn unusual_chunks_are_left_to_serde() {
        for payload in [
            r#"{"choices":[{"delta":{"content":"a\nb"}}]}"#,
            r#"{"id":"a\"b","choices":[]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
            r#"{"error":{"message":"boom"}}"#,
            r#"{"choices":[],"choices":[]}"#,
            r#"{"choices":[{"text":"a","text":"b"}]}"#,
            r#"{"choices":[{"delta":["as","a","sequence"]}]}"#,
            r#"{"choices":[{"text":5}]}"#,
            r#"{"created":01,"choices":[]}"#,
            r#"{"created":1.,"choices":[]}"#,
            r#"{"choices":[]}x"#,
            r#"{"choices":[],}"#,
            "{\"choices\":[{\"text\":\"tab\there\"}]}",
            r#"[[{"text":"a"}]]"#,
            "",
            "{",
        ] {
            assert_eq!(scan(payload), None, "{payload}");
        }
    }

    fn leaf() -> impl Strategy<Value = String> {
        let valid = prop::sample::select(vec![
            "null",
            "true",
            "false",
            "0",
            "-1",
            "1.5",
            "2e10",
            "-0.0E-3",
            r#""""#,
            r#""hi""#,
            r#""a\nb""#,
            r#""\u0041""#,
            r#""日本""#,
            r#""stop""#,
            r#""length""#,
            r#""\"""#,
        ]);
        let broken = prop::sample::select(vec![
            "01",
            "1.",
            "1e",
            "1E+",
            "-",
            "-a",
            "nul",
            "tru",
            r#""\u00""#,
            "\"\u{1}\"",
            r#""\x""#,
            "\"",
            "{",
            "]",
        ]);
        prop_oneof![8 => valid, 1 => broken].prop_map(str::to_owned)
    }

    fn key() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "id",
            "object",
            "model",
            "choices",
            "delta",
            "content",
            "text",
            "finish_reason",
            "usage",
            "error",
            "message",
            "index",
            "logprobs",
            "prompt_tokens",
            r"cho\u0069ces",
            "",
        ])
        .prop_map(|k| format!("\"{k}\""))
    }

    fn ws() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", "", "", " ", "\n\t", "\r ", "\u{a0}"])
    }

    /// An object of these members, with random whitespace.
    fn object(members: impl Strategy<Value = (String, String)> + 'static) -> BoxedStrategy<String> {
        prop::collection::vec((ws(), members, ws(), ws()), 0..5)
            .prop_map(|members| {
                let body: Vec<String> = members
                    .into_iter()
                    .map(|(a, (k, v), b, c)| format!("{a}{k}{b}:{c}{v}"))
                    .collect();
                format!("{{{}}}", body.join(","))
            })
            .boxed()
    }

    fn array(items: impl Strategy<Value = String> + 'static) -> BoxedStrategy<String> {
        prop::collection::vec((ws(), items), 0..4)
            .prop_map(|items| {
                let body: Vec<String> = items.into_iter().map(|(w, v)| format!("{w}{v}")).collect();
                format!("[{}]", body.join(","))
            })
            .boxed()
    }

    /// Any value of the keys chunks have, valid JSON or not.
    fn value() -> BoxedStrategy<String> {
        leaf()
            .prop_recursive(4, 48, 5, |inner| {
                prop_oneof![object((key(), inner.clone())), array(inner)]
            })
            .boxed()
    }

    fn field(name: &'static str, v: BoxedStrategy<String>) -> BoxedStrategy<(String, String)> {
        v.prop_map(move |v| (format!("\"{name}\""), v)).boxed()
    }

    /// Mostly chunk-shaped: the fields the fast path reads, at their places, with values of
    /// every kind, repeated or missing, among others.
    fn chunk_like() -> BoxedStrategy<String> {
        let delta = prop_oneof![
            1 => value(),
            3 => object(prop_oneof![field("content", value()), (key(), value()).boxed()]),
        ]
        .boxed();
        let choice = prop_oneof![
            1 => value(),
            4 => object(prop_oneof![
                field("delta", delta),
                field("text", value()),
                field("finish_reason", value()),
                (key(), value()).boxed(),
            ]),
        ]
        .boxed();
        object(prop_oneof![
            3 => field("choices", prop_oneof![1 => value(), 4 => array(choice)].boxed()),
            1 => field("usage", value()),
            1 => field("error", value()),
            2 => (key(), value()).boxed(),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Random JSON-like text over the fields chunks have, valid or not.
        #[test]
        fn the_fast_path_agrees_with_serde(v in prop_oneof![value(), chunk_like()]) {
            agrees(&v);
        }

        /// The same, cut or with one character replaced (what a broken upstream sends).
        #[test]
        fn the_fast_path_agrees_with_serde_on_damaged_payloads(
            v in chunk_like(),
            at in any::<prop::sample::Index>(),
            with in prop::sample::select(vec!['"', '\\', '{', '}', '[', ']', ',', ':', '0', 'n', ' ']),
            cut in any::<bool>(),
        ) {
            let chars: Vec<char> = v.chars().collect();
            if !chars.is_empty() {
                let i = at.index(chars.len());
                let damaged: String = if cut {
                    chars[..i].iter().collect()
                } else {
                    chars[..i].iter().chain(std::iter::once(&with)).chain(&chars[i + 1..]).collect()
                };
                agrees(&damaged);
            }
        }

        /// Chunk-shaped payloads: the fast path answers for those without escapes, usage or
        /// error, and agrees with serde.
        #[test]
        fn chunk_shaped_payloads_take_the_fast_path(
            text in prop::option::of("[a-zA-Z0-9 .,!?é日🦀]{0,12}"),
            // A chat chunk's `text` besides its `delta.content` (the content wins).
            also_text in prop::option::of("[a-z]{1,4}"),
            finish in prop::option::of(prop::sample::select(vec!["stop", "length"])),
            // A second choice (the first one counts).
            second in prop::option::of("[a-z]{1,4}"),
            extra in prop::collection::vec((key(), leaf()), 0..3),
            chat in any::<bool>(),
        ) {
            let s = |v: &Option<String>| v.as_ref().map_or("null".to_owned(), |t| format!("\"{t}\""));
            let f = finish.map(str::to_owned);
            let choice = if chat {
                format!(
                    r#"{{"index":0,"delta":{{"content":{}}},"text":{},"logprobs":null,"finish_reason":{}}}"#,
                    s(&text), s(&also_text), s(&f)
                )
            } else {
                format!(r#"{{"text":{},"index":0,"logprobs":null,"finish_reason":{}}}"#, s(&text), s(&f))
            };
            let second = second.map_or(String::new(), |t| format!(r#",{{"index":1,"delta":{{"content":"{t}"}},"text":"{t}","finish_reason":"stop"}}"#));
            let extra: String = extra
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "\"choices\"" | "\"usage\"" | "\"error\"" | r#""cho\u0069ces""#))
                .map(|(k, v)| format!(",{k}:{v}"))
                .collect();
            let payload = format!(r#"{{"id":"chatcmpl-x","created":1,"choices":[{choice}{second}]{extra}}}"#);
            agrees(&payload);
            if serde_json::from_str::<serde::de::IgnoredAny>(&payload).is_ok() && !extra.contains('\\') {
                let want = if chat { text.as_deref().or(also_text.as_deref()) } else { text.as_deref() };
                prop_assert_eq!(scan(&payload), Some(Fields { text: want, finish: f.as_deref() }));
            }
        }
    }
}
