//! Turning a token byte stream into client-visible text: incremental UTF-8 decoding and
//! stop-sequence matching that never leaks a partial stop string to the client.

/// Accumulates token bytes and yields only complete UTF-8 characters.
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// Appends bytes and returns the text that is now complete; invalid bytes become U+FFFD.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, tail) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = tail.get(bad..).unwrap_or_default();
                        }
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            rest = tail;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// Whatever is left at the end of generation (an unfinished character) becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            String::new()
        } else {
            self.pending.clear();
            char::REPLACEMENT_CHARACTER.to_string()
        }
    }
}

/// Finds stop sequences across token boundaries, holding back text that might begin one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What to send after feeding text to a [`StopMatcher`].
#[derive(Debug, PartialEq, Eq)]
pub struct StopOutcome {
    pub emit: String,
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.held.push_str(text);
        if self.stops.is_empty() {
            return StopOutcome {
                emit: std::mem::take(&mut self.held),
                stopped: false,
            };
        }
        let first_hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_hit {
            let emit = self.held.get(..at).unwrap_or_default().to_owned();
            self.held.clear();
            return StopOutcome {
                emit,
                stopped: true,
            };
        }
        let keep = self.partial_suffix_len();
        let cut = self.held.len() - keep;
        let emit = self.held.get(..cut).unwrap_or_default().to_owned();
        self.held = self.held.get(cut..).unwrap_or_default().to_owned();
        StopOutcome {
            emit,
            stopped: false,
        }
    }

    /// Text held back at the end of generation was not a stop sequence after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop sequence.
    fn partial_suffix_len(&self) -> usize {
        let max = self
            .stops
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .saturating_sub(1);
        let len = self.held.len();
        (1..=max.min(len))
            .rev()
            .find(|&k| {
                self.held.is_char_boundary(len - k)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.starts_with(&self.held[len - k..]))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_tokens() {
        let mut d = Utf8Decoder::default();
        let snow = "☃".as_bytes();
        assert_eq!(d.push(&snow[..1]), "");
        assert_eq!(d.push(&snow[1..2]), "");
        assert_eq!(d.push(&[snow[2], b'a']), "☃a");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn utf8_invalid_bytes_replaced_and_tail_flushed() {
        let mut d = Utf8Decoder::default();
        assert_eq!(d.push(&[b'x', 0xff, b'y']), "x\u{fffd}y");
        assert_eq!(d.push(&[0xe2, 0x98]), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_across_chunks_is_never_leaked() {
        let mut m = StopMatcher::new(vec!["\nUser:".into()]);
        assert_eq!(
            m.push("Hello"),
            StopOutcome {
                emit: "Hello".into(),
                stopped: false
            }
        );
        assert_eq!(
            m.push(" there\nUs"),
            StopOutcome {
                emit: " there".into(),
                stopped: false
            }
        );
        assert_eq!(
            m.push("er: hi"),
            StopOutcome {
                emit: "".into(),
                stopped: true
            }
        );
    }

    #[test]
    fn false_alarm_is_released() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("ST").emit, "");
        assert_eq!(
            m.push("ay"),
            StopOutcome {
                emit: "STay".into(),
                stopped: false
            }
        );
        assert_eq!(m.push("S").emit, "");
        assert_eq!(m.finish(), "S");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["c".into(), "ab".into()]);
        assert_eq!(
            m.push("xabc"),
            StopOutcome {
                emit: "x".into(),
                stopped: true
            }
        );
    }

    #[test]
    fn multibyte_stop_and_boundaries() {
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(
            m.push("café"),
            StopOutcome {
                emit: "caf".into(),
                stopped: false
            }
        );
        assert_eq!(
            m.push("!"),
            StopOutcome {
                emit: "".into(),
                stopped: true
            }
        );
    }

    #[test]
    fn no_stops_passes_through() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(
            m.push("abc"),
            StopOutcome {
                emit: "abc".into(),
                stopped: false
            }
        );
    }
}
