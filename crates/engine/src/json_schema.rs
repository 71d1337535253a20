//! JSON Schema → GBNF, llama.cpp's grammar format, for JSON mode and structured outputs.
//!
//! Sound, not complete: every text the grammar allows is an instance of the schema, but not every
//! instance can be generated — properties a schema allows without listing them are never
//! produced, optional properties come after the required ones in the order they are listed, and
//! whitespace is limited. Keywords that narrow values in ways the grammar does not express
//! (`pattern`, `minimum`, `uniqueItems`, …) are refused by name, never ignored; annotations
//! (`title`, `description`, `default`, `examples`, unknown `x-…` keywords) are ignored.
//!
//! Pure: no llama.cpp here. The HTTP layer converts a request's schema to refuse what cannot be
//! enforced before anything is routed (so every node of a network accepts the same schemas);
//! the embedded engine converts it again and hands the grammar to llama.cpp.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde_json::{Map, Value};

use crate::int_range::{self, LIMIT};

/// Numeric bounds: enforced on integers (as digit patterns), refused on other numbers.
const BOUNDS: [&str; 4] = ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"];

/// Deepest nesting of subschemas followed (a `$ref` cycle ends in a rule, not in recursion).
const MAX_DEPTH: usize = 64;
/// Most rules one grammar may have.
const MAX_RULES: usize = 2048;
/// Largest `minItems`/`maxItems`/`minLength`/`maxLength`: llama.cpp expands a bounded
/// repetition into one rule per count.
const MAX_REPEAT: u64 = 1024;
/// Most rules all of a schema's bounded repetitions may expand to together, so that a schema
/// of many long bounded strings cannot make a node build millions of grammar rules.
const MAX_EXPANDED: u64 = 8192;

/// Why a schema cannot be turned into a grammar; the message names the keyword and its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError(pub String);

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SchemaError {}

/// Keywords that constrain values in ways the grammar does not express.
const REFUSED: [&str; 22] = [
    "pattern",
    "multipleOf",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "allOf",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "propertyNames",
    "patternProperties",
    "prefixItems",
    "additionalItems",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedProperties",
    "unevaluatedItems",
];

/// Rules every grammar may use, with the rules they use in turn.
const BUILTINS: [(&str, &str, &[&str]); 13] = [
    ("space", r#"| " " | "\n" [ \t]{0,20}"#, &[]),
    ("null", r#""null" space"#, &["space"]),
    ("boolean", r#"("true" | "false") space"#, &["space"]),
    (
        "integer",
        r#"("-"? ([0-9] | [1-9] [0-9]{0,15})) space"#,
        &["space"],
    ),
    (
        "number",
        r#"("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})? space"#,
        &["space"],
    ),
    (
        "char",
        r#"[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})"#,
        &[],
    ),
    ("string", r#""\"" char* "\"" space"#, &["char", "space"]),
    (
        "value",
        "object | array | string | number | boolean | null",
        &["object", "array", "string", "number", "boolean", "null"],
    ),
    (
        "object",
        r#""{" space ( string ":" space value ( "," space string ":" space value )* )? "}" space"#,
        &["string", "value", "space"],
    ),
    (
        "array",
        r#""[" space ( value ( "," space value )* )? "]" space"#,
        &["value", "space"],
    ),
    (
        "date",
        r#"[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )"#,
        &[],
    ),
    (
        "time",
        r#"( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,6} )? ( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )"#,
        &[],
    ),
    (
        "uuid",
        r#"[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}"#,
        &[],
    ),
];

/// The grammar of OpenAI's JSON mode: any JSON object.
pub fn json_object_grammar() -> String {
    let mut c = Converter::new(&Value::Null);
    let root = c.builtin("object");
    c.finish(root)
}

/// The grammar of the instances of `schema` (see the module doc for which).
pub fn schema_grammar(schema: &Value) -> Result<String, SchemaError> {
    let mut c = Converter::new(schema);
    let root = c.visit(schema, "schema", 0)?;
    Ok(c.finish(root))
}

struct Converter<'a> {
    root: &'a Value,
    /// Bodies of the generated rules; rule `i` is named `r{i}`.
    rules: Vec<String>,
    builtins: BTreeSet<&'static str>,
    /// `$ref` target → its rule's name, so shared and recursive definitions are made once.
    refs: HashMap<String, String>,
    /// Rules llama.cpp will make for the bounded repetitions so far.
    expanded: u64,
}

impl<'a> Converter<'a> {
    fn new(root: &'a Value) -> Self {
        Self {
            root,
            rules: Vec::new(),
            builtins: BTreeSet::new(),
            refs: HashMap::new(),
            expanded: 0,
        }
    }

    /// Counts the rules a repetition of `min..=max` expands to against [`MAX_EXPANDED`].
    fn expand(&mut self, min: u64, max: Option<u64>, at: &str) -> Result<(), SchemaError> {
        self.expanded += max.unwrap_or(min);
        if self.expanded > MAX_EXPANDED {
            return Err(SchemaError(format!(
                "the schema's length and item bounds add up to more than {MAX_EXPANDED} (at `{at}`)"
            )));
        }
        Ok(())
    }

    fn finish(self, root: String) -> String {
        let mut out = format!("root ::= {root}\n");
        for (i, body) in self.rules.iter().enumerate() {
            out.push_str(&format!("r{i} ::= {body}\n"));
        }
        for (name, body, _) in BUILTINS {
            if self.builtins.contains(name) {
                out.push_str(&format!("{name} ::= {body}\n"));
            }
        }
        out
    }

    fn builtin(&mut self, name: &'static str) -> String {
        if self.builtins.insert(name) {
            for (n, _, deps) in BUILTINS {
                if n == name {
                    for d in deps {
                        self.builtin(d);
                    }
                }
            }
        }
        name.to_owned()
    }

    /// Reserves a rule (a body is set later, for rules that may refer to themselves).
    fn reserve(&mut self, at: &str) -> Result<usize, SchemaError> {
        if self.rules.len() >= MAX_RULES {
            return Err(SchemaError(format!(
                "the schema needs more than {MAX_RULES} grammar rules (at `{at}`)"
            )));
        }
        self.rules.push(String::new());
        Ok(self.rules.len() - 1)
    }

    /// A new rule with `body`; returns its name.
    fn rule(&mut self, at: &str, body: String) -> Result<String, SchemaError> {
        let i = self.reserve(at)?;
        self.rules[i] = body;
        Ok(format!("r{i}"))
    }

    /// A GBNF expression for `schema`, found at `at` (a path for error messages).
    fn visit(&mut self, schema: &Value, at: &str, depth: usize) -> Result<String, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(SchemaError(format!(
                "the schema nests deeper than {MAX_DEPTH} levels (at `{at}`)"
            )));
        }
        let s = match schema {
            Value::Bool(true) => return Ok(self.builtin("value")),
            Value::Bool(false) => {
                return Err(SchemaError(format!(
                    "`{at}` is `false`: nothing matches it"
                )));
            }
            Value::Object(s) => s,
            _ => {
                return Err(SchemaError(format!(
                    "`{at}` must be a schema (an object or a boolean)"
                )));
            }
        };
        if let Some(k) = REFUSED.iter().find(|k| s.contains_key(**k)) {
            return Err(SchemaError(format!(
                "`{at}` uses `{k}`, which this network cannot enforce yet"
            )));
        }
        if let Some(k) = BOUNDS.iter().find(|k| s.contains_key(**k)) {
            let integers = match s.get("type") {
                Some(Value::String(t)) => t == "integer",
                Some(Value::Array(ts)) => {
                    ts.contains(&Value::from("integer"))
                        && ts.iter().all(|t| t == "integer" || t == "null")
                }
                _ => false,
            };
            let combined = ["$ref", "const", "enum", "anyOf", "oneOf"]
                .iter()
                .any(|c| s.contains_key(*c));
            if !integers || combined {
                return Err(SchemaError(format!(
                    "`{at}` uses `{k}`, which this network can enforce only on a plain `integer` schema"
                )));
            }
        }
        if let Some(r) = s.get("$ref") {
            return self.reference(r, at, depth);
        }
        if let Some(v) = s.get("const") {
            return Ok(self.literal(v));
        }
        if let Some(e) = s.get("enum") {
            let values = e
                .as_array()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| SchemaError(format!("`{at}.enum` must be a non-empty array")))?;
            let alts: Vec<String> = values.iter().map(|v| self.literal(v)).collect();
            return Ok(format!("( {} )", alts.join(" | ")));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(list) = s.get(key) {
                let list = list.as_array().filter(|v| !v.is_empty()).ok_or_else(|| {
                    SchemaError(format!("`{at}.{key}` must be a non-empty array"))
                })?;
                let mut alts = Vec::with_capacity(list.len());
                for (i, sub) in list.iter().enumerate() {
                    alts.push(self.visit(sub, &format!("{at}.{key}[{i}]"), depth + 1)?);
                }
                return Ok(format!("( {} )", alts.join(" | ")));
            }
        }
        let mut types: Vec<&str> = match s.get("type") {
            None => {
                if s.contains_key("properties") || s.contains_key("required") {
                    vec!["object"]
                } else if s.contains_key("items") {
                    vec!["array"]
                } else {
                    return Ok(self.builtin("value"));
                }
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) if !ts.is_empty() => ts
                .iter()
                .map(|t| {
                    t.as_str().ok_or_else(|| {
                        SchemaError(format!("`{at}.type` must name types as strings"))
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(SchemaError(format!(
                    "`{at}.type` must be a type name or a non-empty array of them"
                )));
            }
        };
        if s.get("nullable") == Some(&Value::Bool(true)) && !types.contains(&"null") {
            types.push("null");
        }
        let mut alts = Vec::with_capacity(types.len());
        for t in types {
            alts.push(match t {
                "object" => self.object(s, at, depth)?,
                "array" => self.array(s, at, depth)?,
                "string" => self.string(s, at)?,
                "integer" => self.integer(s, at)?,
                "number" => self.builtin("number"),
                "boolean" => self.builtin("boolean"),
                "null" => self.builtin("null"),
                other => {
                    return Err(SchemaError(format!(
                        "`{at}.type` names an unknown type `{other}`"
                    )));
                }
            });
        }
        Ok(if alts.len() == 1 {
            alts.remove(0)
        } else {
            format!("( {} )", alts.join(" | "))
        })
    }

    fn reference(&mut self, r: &Value, at: &str, depth: usize) -> Result<String, SchemaError> {
        let target = r
            .as_str()
            .ok_or_else(|| SchemaError(format!("`{at}.$ref` must be a string")))?;
        if let Some(name) = self.refs.get(target) {
            return Ok(name.clone());
        }
        let pointer = target.strip_prefix('#').ok_or_else(|| {
            SchemaError(format!(
                "`{at}.$ref` is `{target}`; only references inside the schema (`#/…`) are supported"
            ))
        })?;
        let root = self.root;
        let sub = root.pointer(pointer).ok_or_else(|| {
            SchemaError(format!(
                "`{at}.$ref` points at `{target}`, which the schema does not have"
            ))
        })?;
        let i = self.reserve(at)?;
        let name = format!("r{i}");
        self.refs.insert(target.to_owned(), name.clone());
        self.rules[i] = self.visit(sub, target, depth + 1)?;
        Ok(name)
    }

    /// An integer, within the schema's bounds if it has any.
    fn integer(&mut self, s: &Map<String, Value>, at: &str) -> Result<String, SchemaError> {
        let Some((lo, hi)) = int_bounds(s, at)? else {
            return Ok(self.builtin("integer"));
        };
        let space = self.builtin("space");
        let alts: Vec<String> = int_range::patterns(lo, hi)
            .iter()
            .map(|p| {
                let mut alt = String::from(if p.negative { "\"-\"" } else { "" });
                for d in &p.digits {
                    if !alt.is_empty() {
                        alt.push(' ');
                    }
                    let (lo, hi) = (char::from(d.lo), char::from(d.hi));
                    alt.push_str(&if lo == hi {
                        format!("\"{lo}\"")
                    } else {
                        format!("[{lo}-{hi}]")
                    });
                    if d.count > 1 {
                        alt.push_str(&format!("{{{}}}", d.count));
                    }
                }
                alt
            })
            .collect();
        Ok(format!("( {} ) {space}", alts.join(" | ")))
    }

    /// The JSON text of `v` as a literal, then optional whitespace.
    fn literal(&mut self, v: &Value) -> String {
        let space = self.builtin("space");
        format!("{} {space}", gbnf_literal(&v.to_string()))
    }

    fn object(
        &mut self,
        s: &Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<String, SchemaError> {
        let empty = Map::new();
        let props = match s.get("properties") {
            None => &empty,
            Some(Value::Object(p)) => p,
            Some(_) => return Err(SchemaError(format!("`{at}.properties` must be an object"))),
        };
        let required: Vec<&str> = match s.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r
                .iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| {
                        SchemaError(format!("`{at}.required` must list property names"))
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(SchemaError(format!("`{at}.required` must be an array"))),
        };
        let space = self.builtin("space");
        if props.is_empty() && required.is_empty() {
            return Ok(match s.get("additionalProperties") {
                Some(Value::Bool(false)) => format!(r#""{{" {space} "}}" {space}"#),
                None | Some(Value::Bool(true)) => self.builtin("object"),
                Some(extra) => {
                    let v = self.visit(extra, &format!("{at}.additionalProperties"), depth + 1)?;
                    let key = self.builtin("string");
                    let kv = self.rule(at, format!(r#"{key} ":" {space} {v}"#))?;
                    self.rule(
                        at,
                        format!(r#""{{" {space} ( {kv} ( "," {space} {kv} )* )? "}}" {space}"#),
                    )?
                }
            });
        }
        // Required properties first, in the order they are listed (under `properties`, then
        // any only named in `required`), then the optional ones.
        let mut order: Vec<(&str, bool)> = props
            .keys()
            .filter(|k| required.contains(&k.as_str()))
            .map(|k| (k.as_str(), true))
            .collect();
        for r in &required {
            if !order.iter().any(|(k, _)| k == r) {
                order.push((r, true));
            }
        }
        order.extend(
            props
                .keys()
                .filter(|k| !required.contains(&k.as_str()))
                .map(|k| (k.as_str(), false)),
        );
        let mut kvs = Vec::with_capacity(order.len());
        for (key, req) in order {
            let value = match props.get(key) {
                Some(p) => self.visit(p, &format!("{at}.properties.{key}"), depth + 1)?,
                None => self.builtin("value"),
            };
            let name = gbnf_literal(&Value::String(key.to_owned()).to_string());
            let kv = self.rule(at, format!(r#"{name} {space} ":" {space} {value}"#))?;
            kvs.push((kv, req));
        }
        let n_required = kvs.iter().filter(|(_, r)| *r).count();
        let (req, opt): (Vec<_>, Vec<_>) = kvs.into_iter().partition(|(_, r)| *r);
        let req: Vec<String> = req.into_iter().map(|(k, _)| k).collect();
        let opt: Vec<String> = opt.into_iter().map(|(k, _)| k).collect();
        // tails[i]: the optional properties from i on, each with its leading comma, each optional.
        // (Without required properties the first optional one comes without a comma, so the
        // tail starting at it is never used.)
        let mut tails = vec![String::new(); opt.len() + 1];
        let first = usize::from(n_required == 0);
        for i in (first..opt.len()).rev() {
            let rest = &tails[i + 1];
            tails[i] = self.rule(
                at,
                format!(r#"( "," {space} {} )? {rest}"#, opt[i])
                    .trim_end()
                    .to_owned(),
            )?;
        }
        let body = if n_required > 0 {
            let sep = format!(r#" "," {space} "#);
            format!("{} {}", req.join(&sep), tails[0])
        } else {
            // The first optional property present has no comma before it.
            let alts: Vec<String> = (0..opt.len())
                .map(|i| format!("{} {}", opt[i], tails[i + 1]).trim_end().to_owned())
                .collect();
            format!("( {} )?", alts.join(" | "))
        };
        self.rule(
            at,
            format!(r#""{{" {space} {} "}}" {space}"#, body.trim_end()),
        )
    }

    fn array(
        &mut self,
        s: &Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<String, SchemaError> {
        let item = match s.get("items") {
            None => self.builtin("value"),
            Some(i) => self.visit(i, &format!("{at}.items"), depth + 1)?,
        };
        let item = self.rule(at, item)?;
        let (min, max) = bounds(s, at, "minItems", "maxItems")?;
        self.expand(min, max, at)?;
        let space = self.builtin("space");
        // The items after the first: `n` or more, up to `max - 1`.
        let more = |n: u64| match max {
            Some(1) => String::new(),
            _ => format!(
                r#" ( "," {space} {item} ){}"#,
                repeat(n, max.map(|m| m - 1))
            ),
        };
        let body = match (min, max) {
            (_, Some(0)) => String::new(),
            (0, _) => format!(" ( {item}{} )?", more(0)),
            (m, _) => format!(" {item}{}", more(m - 1)),
        };
        self.rule(at, format!(r#""[" {space}{body} "]" {space}"#))
    }

    fn string(&mut self, s: &Map<String, Value>, at: &str) -> Result<String, SchemaError> {
        let space = self.builtin("space");
        if let Some(f) = s.get("format") {
            if s.contains_key("minLength") || s.contains_key("maxLength") {
                return Err(SchemaError(format!(
                    "`{at}` combines `format` with a length, which this network cannot enforce yet"
                )));
            }
            let inner = match f.as_str() {
                Some("date") => self.builtin("date"),
                Some("time") => self.builtin("time"),
                Some("date-time") => {
                    let d = self.builtin("date");
                    let t = self.builtin("time");
                    format!(r#"{d} "T" {t}"#)
                }
                Some("uuid") => self.builtin("uuid"),
                _ => {
                    return Err(SchemaError(format!(
                        "`{at}.format` is {f}; only date, time, date-time and uuid can be enforced"
                    )));
                }
            };
            return Ok(format!(r#""\"" {inner} "\"" {space}"#));
        }
        let (min, max) = bounds(s, at, "minLength", "maxLength")?;
        if min == 0 && max.is_none() {
            return Ok(self.builtin("string"));
        }
        self.expand(min, max, at)?;
        let c = self.builtin("char");
        Ok(format!(r#""\"" {c}{} "\"" {space}"#, repeat(min, max)))
    }
}

/// `{min,max}` for GBNF (`*` and `+` for the common unbounded cases).
fn repeat(min: u64, max: Option<u64>) -> String {
    match (min, max) {
        (0, None) => "*".into(),
        (1, None) => "+".into(),
        (m, None) => format!("{{{m},}}"),
        (m, Some(n)) if m == n => format!("{{{m}}}"),
        (m, Some(n)) => format!("{{{m},{n}}}"),
    }
}

/// A schema's lower and upper count bounds, checked.
fn bounds(
    s: &Map<String, Value>,
    at: &str,
    lo: &str,
    hi: &str,
) -> Result<(u64, Option<u64>), SchemaError> {
    let get = |k: &str| -> Result<Option<u64>, SchemaError> {
        match s.get(k) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= MAX_REPEAT => Ok(Some(n)),
                _ => Err(SchemaError(format!(
                    "`{at}.{k}` must be an integer from 0 to {MAX_REPEAT}"
                ))),
            },
        }
    };
    let min = get(lo)?.unwrap_or(0);
    let max = get(hi)?;
    if max.is_some_and(|m| m < min) {
        return Err(SchemaError(format!("`{at}.{hi}` is below `{lo}`")));
    }
    Ok((min, max))
}

/// An integer schema's bounds as an inclusive range (`None`: unbounded both ways). Fractional
/// bounds round inwards; the range is clipped to what the grammar writes (16 digits).
fn int_bounds(s: &Map<String, Value>, at: &str) -> Result<Option<(i64, i64)>, SchemaError> {
    // A bound rounded inwards to an integer (`up`: a lower bound): integer literals exactly,
    // fractions through `f64` (`as` saturates; the range is clipped to ±LIMIT anyway).
    let get = |k: &str, up: bool| -> Result<Option<i64>, SchemaError> {
        let Some(v) = s.get(k) else { return Ok(None) };
        if let Some(i) = v.as_i64() {
            return Ok(Some(i));
        }
        if v.as_u64().is_some() {
            return Ok(Some(i64::MAX));
        }
        let f = v
            .as_f64()
            .filter(|f| f.is_finite())
            .ok_or_else(|| SchemaError(format!("`{at}.{k}` must be a number")))?;
        #[allow(clippy::cast_possible_truncation)]
        Ok(Some(if up {
            f.ceil() as i64
        } else {
            f.floor() as i64
        }))
    };
    let (min, max) = (get("minimum", true)?, get("maximum", false)?);
    // x > b is x ≥ floor(b) + 1; x < b is x ≤ ceil(b) − 1.
    let xmin = get("exclusiveMinimum", false)?.map(|b| b.saturating_add(1));
    let xmax = get("exclusiveMaximum", true)?.map(|b| b.saturating_sub(1));
    if min.is_none() && max.is_none() && xmin.is_none() && xmax.is_none() {
        return Ok(None);
    }
    let lo = [min, xmin].into_iter().flatten().fold(-LIMIT, i64::max);
    let hi = [max, xmax].into_iter().flatten().fold(LIMIT, i64::min);
    if lo > hi {
        return Err(SchemaError(format!(
            "`{at}` admits no integer of at most 16 digits (its bounds are empty)"
        )));
    }
    Ok(Some((lo, hi)))
}

/// `text` as a GBNF string literal.
fn gbnf_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grammar(schema: &Value) -> String {
        schema_grammar(schema).unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn refusal(schema: &Value) -> String {
        match schema_grammar(schema) {
            Ok(g) => unreachable!("accepted:\n{g}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn an_object_lists_required_then_optional_properties_in_order() {
        let g = grammar(&json!({
            "type": "object",
            "properties": {
                "b": {"type": "boolean"},
                "name": {"type": "string"},
                "age": {"type": "integer", "description": "years"}
            },
            "required": ["name", "age"],
            "additionalProperties": false
        }));
        assert_eq!(
            g,
            [
                r#"root ::= r4"#,
                r#"r0 ::= "\"name\"" space ":" space string"#,
                r#"r1 ::= "\"age\"" space ":" space integer"#,
                r#"r2 ::= "\"b\"" space ":" space boolean"#,
                r#"r3 ::= ( "," space r2 )?"#,
                r#"r4 ::= "{" space r0 "," space r1 r3 "}" space"#,
                r#"space ::= | " " | "\n" [ \t]{0,20}"#,
                r#"boolean ::= ("true" | "false") space"#,
                r#"integer ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) space"#,
                r#"char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})"#,
                r#"string ::= "\"" char* "\"" space"#,
                "",
            ]
            .join("\n")
        );
    }

    #[test]
    fn all_optional_properties_may_each_come_first() {
        let g = grammar(&json!({"properties": {"x": {}, "y": {}}}));
        assert!(g.contains(r#"r2 ::= ( "," space r1 )?"#), "{g}");
        assert!(
            g.contains(r#"r3 ::= "{" space ( r0 r2 | r1 )? "}" space"#),
            "{g}"
        );
    }

    #[test]
    fn refs_are_shared_and_may_recurse() {
        let g = grammar(&json!({
            "$defs": {"node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["kids"]
            }},
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/node"}, "b": {"$ref": "#/$defs/node"}},
            "required": ["a", "b"]
        }));
        // One rule for the definition, used by both properties and by itself.
        assert_eq!(g.matches("\"\\\"kids\\\"\"").count(), 1, "{g}");
        assert!(g.contains(r#"r5 ::= "\"a\"" space ":" space r0"#), "{g}");
        assert!(g.contains(r#"r6 ::= "\"b\"" space ":" space r0"#), "{g}");
        assert!(g.contains(r#"r1 ::= r0"#), "{g}");
    }

    #[test]
    fn literals_types_and_bounds() {
        let g = grammar(&json!({"enum": ["a\"b", 1, null]}));
        assert_eq!(
            g.lines().next(),
            Some(r#"root ::= ( "\"a\\\"b\"" space | "1" space | "null" space )"#)
        );
        let g = grammar(&json!({"type": ["string", "null"], "maxLength": 3}));
        assert!(
            g.starts_with(r#"root ::= ( "\"" char{0,3} "\"" space | null )"#),
            "{g}"
        );
        let g = grammar(
            &json!({"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4}),
        );
        assert!(
            g.contains(r#""[" space r0 ( "," space r0 ){1,3} "]" space"#),
            "{g}"
        );
        let g = grammar(&json!({"type": "array", "maxItems": 1}));
        assert!(g.contains(r#""[" space ( r0 )? "]" space"#), "{g}");
        let g = grammar(&json!({"type": "string", "format": "date-time"}));
        assert!(
            g.starts_with(r#"root ::= "\"" date "T" time "\"" space"#),
            "{g}"
        );
        assert_eq!(grammar(&json!(true)).lines().next(), Some("root ::= value"));
        assert_eq!(
            grammar(&json!({"const": "x"})).lines().next(),
            Some(r#"root ::= "\"x\"" space"#)
        );
        let g = json_object_grammar();
        assert!(
            g.starts_with("root ::= object\n") && g.contains("value ::="),
            "{g}"
        );
    }

    #[test]
    fn integer_bounds_become_digit_patterns() {
        let g = grammar(&json!({"type": "integer", "minimum": -5, "maximum": 120}));
        assert!(
            g.contains(r#"root ::= ( "-" [1-5] | [0-9] | [1-9] [0-9] | "1" [0-1] [0-9] | "1" "2" "0" ) space"#),
            "{g}"
        );
        // Exclusive and fractional bounds round inwards; a null may stand in.
        let g =
            grammar(&json!({"type": ["integer", "null"], "exclusiveMinimum": 0, "maximum": 9.5}));
        assert!(g.contains(r#"root ::= ( ( [1-9] ) space | null )"#), "{g}");
        // Integer literals are exact beyond 2^53 (through f64 they would round outwards).
        let g = grammar(
            &json!({"type": "integer", "minimum": 9_007_199_254_740_993_i64,
                                "maximum": 9_007_199_254_740_995_i64}),
        );
        assert!(
            g.contains(r#"( "9" "0"{2} "7" "1" "9"{2} "2" "5" "4" "7" "4" "0" "9"{2} [3-5] )"#),
            "{g}"
        );
        // Only a lower bound: up to the 16 digits the plain rule allows.
        let g = grammar(&json!({"type": "integer", "minimum": 10}));
        assert!(g.contains(r#"[1-9] [0-9]{15}"#), "{g}");
        assert!(!g.contains(r#""-""#), "{g}");
    }

    #[test]
    fn what_cannot_be_enforced_is_refused_by_name() {
        for (schema, says) in [
            (
                json!({"type": "string", "pattern": "^a"}),
                "`schema` uses `pattern`",
            ),
            (
                json!({"properties": {"n": {"type": "number", "minimum": 0}}}),
                "`schema.properties.n` uses `minimum`",
            ),
            (json!({"maximum": 3}), "`schema` uses `maximum`"),
            (
                json!({"type": "integer", "enum": [1, 9], "maximum": 3}),
                "only on a plain `integer`",
            ),
            (
                json!({"type": "integer", "minimum": 3, "exclusiveMaximum": 4.0, "maximum": 2}),
                "no integer",
            ),
            (
                json!({"type": "integer", "exclusiveMinimum": true}),
                "must be a number",
            ),
            (
                json!({"type": "integer", "exclusiveMinimum": 1e30}),
                "no integer",
            ),
            (json!({"type": "string", "format": "email"}), "format"),
            (json!({"type": "array", "maxItems": 100_000}), "maxItems"),
            (
                json!({"type": "array", "minItems": 3, "maxItems": 2}),
                "below",
            ),
            (
                json!({"$ref": "https://example.org/s.json"}),
                "inside the schema",
            ),
            (json!({"$ref": "#/$defs/missing"}), "does not have"),
            (json!({"type": "complex"}), "unknown type"),
            (json!({"enum": []}), "non-empty"),
            (json!(false), "nothing matches"),
            (json!(3), "must be a schema"),
        ] {
            let e = refusal(&schema);
            assert!(e.contains(says), "{schema}: {e}");
        }
        let mut wide = serde_json::Map::new();
        for i in 0..9 {
            wide.insert(
                format!("p{i}"),
                json!({"type": "string", "maxLength": 1000}),
            );
        }
        let e = refusal(&json!({"properties": wide}));
        assert!(
            e.contains("add up to more than 8192") && e.contains("properties.p8"),
            "{e}"
        );
        let mut deep = json!({"type": "string"});
        for _ in 0..=MAX_DEPTH {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(refusal(&deep).contains("deeper"));
    }
}
