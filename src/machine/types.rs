//! Validated value types shared by every layer: names, identities, generations,
//! status codes and timestamps. Constructors validate; serde goes through the
//! same constructors, so an invalid value cannot enter from a log or a config.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest accepted instance name, in bytes. Long enough for a tenant id plus a
/// suffix, short enough to be a path component on every file system.
pub const INSTANCE_NAME_LEN_MAX: usize = 64;

/// Longest accepted peer identity, in bytes. A WhatsApp JID or a Discord
/// session id is well under 100 bytes; the cap bounds what a peer can make us store.
pub const IDENTITY_LEN_MAX: usize = 256;

/// Why a string is not a valid [`InstanceName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is the empty string.
    #[error("instance name is empty")]
    Empty,
    /// The name is longer than [`INSTANCE_NAME_LEN_MAX`] bytes.
    #[error("instance name is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Length of the rejected name in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name contains a character outside `[A-Za-z0-9._-]`.
    #[error("instance name {name:?} contains {ch:?} at byte {index}; allowed are A-Z a-z 0-9 . _ -")]
    InvalidChar {
        /// The rejected name (escaped when printed).
        name: String,
        /// The offending character.
        ch: char,
        /// Its byte offset.
        index: usize,
    },
    /// The name does not start with a letter or digit (so it is never `.`, `..` or a hidden file).
    #[error("instance name {name:?} must start with a letter or a digit")]
    BadStart {
        /// The rejected name.
        name: String,
    },
}

/// The name of an instance: 1 to 64 bytes of `[A-Za-z0-9._-]`, starting with
/// a letter or digit. A valid name is always a safe single path component:
/// it cannot be empty, `.`, `..`, contain a separator, or start with `-`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InstanceName(String);

impl InstanceName {
    /// Validates `name`.
    ///
    /// ```
    /// use instance_lifecycle::InstanceName;
    /// assert!(InstanceName::new("acme-prod.01").is_ok());
    /// assert!(InstanceName::new("../../etc").is_err());
    /// ```
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > INSTANCE_NAME_LEN_MAX {
            return Err(NameError::TooLong { len: name.len(), max: INSTANCE_NAME_LEN_MAX });
        }
        if let Some((index, ch)) =
            name.char_indices().find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::InvalidChar { name, ch, index });
        }
        if !name.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(NameError::BadStart { name });
        }
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for InstanceName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<InstanceName> for String {
    fn from(n: InstanceName) -> Self {
        n.0
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for InstanceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Why a string is not a valid [`Identity`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Empty identity: a peer that says "ready" without saying who it is (R6).
    #[error("peer identity is empty")]
    Empty,
    /// Longer than [`IDENTITY_LEN_MAX`].
    #[error("peer identity is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Contains a control character (would corrupt logs and terminals).
    #[error("peer identity contains a control character")]
    ControlChar,
}

/// The peer identity of an open session (a WhatsApp JID, a Discord session id).
/// Never empty: rule R6 says an instance is only `Open` with one.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Identity(String);

impl Identity {
    /// Validates a peer identity.
    pub fn new(id: impl Into<String>) -> Result<Self, IdentityError> {
        let id = id.into();
        if id.is_empty() {
            return Err(IdentityError::Empty);
        }
        if id.len() > IDENTITY_LEN_MAX {
            return Err(IdentityError::TooLong { len: id.len(), max: IDENTITY_LEN_MAX });
        }
        if id.chars().any(char::is_control) {
            return Err(IdentityError::ControlChar);
        }
        Ok(Self(id))
    }

    /// The identity as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Identity {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<Identity> for String {
    fn from(i: Identity) -> Self {
        i.0
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// The number of a connection attempt of one instance. Every attempt gets the
/// next generation; a signal tagged with another generation is stale (R12).
/// Generation 0 means "never connected".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation of the next connection attempt.
    #[must_use]
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// A close status: an application status such as 401 or 515 (Baileys' reasons),
/// or a WebSocket close code such as 1000 or 4004. How a wire close code maps to
/// a status is the protocol's business (see the reference protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StatusCode(pub u16);

impl StatusCode {
    /// 1000, normal closure (RFC 6455).
    pub const NORMAL: Self = Self(1000);
    /// 408, request timeout: what the engine sends when a connect times out.
    pub const TIMEOUT: Self = Self(408);
    /// 1012, service restart (IANA registry): what the engine sends on `restart`.
    pub const RESTART: Self = Self(1012);
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A point in time, in milliseconds since the Unix epoch. The core never reads
/// a clock: the runtime passes `now` in, the simulator passes virtual time, and
/// replay passes the time recorded in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// `self + d`, saturating at the end of time.
    #[must_use]
    pub fn saturating_add(self, d: Duration) -> Self {
        Self(self.0.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Self) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Timestamp {
    /// `YYYY-MM-DD HH:MM:SS.mmm` in UTC.
    pub fn utc(self) -> String {
        let (secs, ms) = (self.0 / 1000, self.0 % 1000);
        let (days, rem) = (secs / 86_400, secs % 86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        // u64 milliseconds make fewer than 2^38 days: the conversion cannot fail.
        let z = i64::try_from(days).unwrap_or(0) + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{ms:03}", rem / 3600, rem / 60 % 60, rem % 60)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// Longest reason or error text kept: close reasons are at most 123 bytes by
/// RFC 6455, OS errors are short; a hostile peer or host gets no more.
pub const REASON_LEN_MAX: usize = 256;

/// A reason or error text from outside the core (a close reason, a
/// transport error, a panic message, a cleanup step's error): at most
/// [`REASON_LEN_MAX`] bytes, cut on a character boundary, control characters
/// replaced by spaces, so a peer cannot make a record large or a terminal garbled.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct Reason(String);

impl Reason {
    /// Bounds `text`.
    pub fn new(text: impl Into<String>) -> Self {
        let mut s: String = text.into();
        if s.chars().any(char::is_control) {
            s = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        }
        if s.len() > REASON_LEN_MAX {
            let mut end = REASON_LEN_MAX;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        Self(s)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for Reason {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl From<&str> for Reason {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<Reason> for String {
    fn from(r: Reason) -> Self {
        r.0
    }
}

impl std::ops::Deref for Reason {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Longest URL accepted.
pub const URL_LEN_MAX: usize = 2048;

/// Why a string is not a [`WsUrl`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid url {url:?}: {reason}")]
pub struct UrlError {
    /// The URL given (at most [`URL_LEN_MAX`] characters of it).
    pub url: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// A WebSocket URL: `ws://` or `wss://`, a host, at most [`URL_LEN_MAX`]
/// bytes, no whitespace or control characters. Where an instance connects.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WsUrl(String);

impl WsUrl {
    /// Validates `url`.
    ///
    /// ```
    /// use instance_lifecycle::machine::WsUrl;
    /// assert!(WsUrl::parse("wss://gateway.example/ws").is_ok());
    /// assert!(WsUrl::parse("http://typo").is_err());
    /// ```
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let bad = |reason| Err(UrlError { url: url.chars().take(URL_LEN_MAX).collect(), reason });
        if url.len() > URL_LEN_MAX {
            return bad("longer than 2048 bytes");
        }
        let Some(rest) = url.strip_prefix("ws://").or_else(|| url.strip_prefix("wss://")) else {
            return bad("must start with ws:// or wss://");
        };
        if rest.is_empty() || rest.starts_with('/') {
            return bad("has no host");
        }
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad("contains whitespace or control characters");
        }
        Ok(Self(url.to_owned()))
    }

    /// The URL.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WsUrl {
    type Error = UrlError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<WsUrl> for String {
    fn from(u: WsUrl) -> Self {
        u.0
    }
}

impl fmt::Display for WsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_bounded_and_printable() {
        let long = Reason::new("é".repeat(REASON_LEN_MAX));
        assert!(long.as_str().len() <= REASON_LEN_MAX && long.as_str().len() > REASON_LEN_MAX - 2);
        assert_eq!(Reason::new("a\nb\u{1b}[31m"), "a b [31m");
        let json = serde_json::to_string(&Reason::new("x".repeat(1000))).expect("json");
        let back: Reason = serde_json::from_str(&json).expect("back");
        assert_eq!(back.as_str().len(), REASON_LEN_MAX);
    }

    #[test]
    fn urls_are_websocket_urls_with_a_host() {
        for good in ["ws://127.0.0.1:9/", "wss://gateway.example/ws?x=1"] {
            assert_eq!(WsUrl::parse(good).map(|u| u.to_string()), Ok(good.to_owned()));
        }
        for bad in ["http://typo", "ws://", "wss:///path", "ws://a b", ""] {
            assert!(WsUrl::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(WsUrl::parse(&format!("ws://{}", "a".repeat(URL_LEN_MAX))).is_err());
    }

    #[test]
    fn names_that_could_escape_a_directory_are_rejected() {
        for bad in ["", ".", "..", "../../etc", "a/b", "a\\b", "-rf", ".hidden", "é", "a b", "a\0b"] {
            assert!(InstanceName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(InstanceName::new("x".repeat(INSTANCE_NAME_LEN_MAX)).is_ok());
        assert_eq!(
            InstanceName::new("x".repeat(INSTANCE_NAME_LEN_MAX + 1)),
            Err(NameError::TooLong { len: INSTANCE_NAME_LEN_MAX + 1, max: INSTANCE_NAME_LEN_MAX })
        );
        for good in ["a", "acme-prod.01", "A_b-9", "7"] {
            assert_eq!(InstanceName::new(good).map(|n| n.as_str().to_owned()), Ok(good.to_owned()));
        }
    }

    #[test]
    fn serde_validates_names_and_identities() {
        let err = serde_json::from_str::<InstanceName>("\"../x\"");
        assert!(err.is_err());
        assert!(serde_json::from_str::<Identity>("\"\"").is_err());
        let id: Identity = serde_json::from_str("\"5511@s.whatsapp.net\"").expect("valid identity");
        assert_eq!(id.as_str(), "5511@s.whatsapp.net");
    }

    /// Every day from 1970 to 2170 against a plain calendar walk (leap years
    /// by the Gregorian rule): the civil-date arithmetic has no other oracle.
    #[test]
    fn utc_dates_agree_with_a_calendar_walk() {
        let leap = |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
        let (mut year, mut month, mut day) = (1970u64, 1u64, 1u64);
        for days in 0..(200 * 365 + 49) {
            let at = Timestamp(days * 86_400_000 + 3_723_004);
            assert_eq!(at.utc(), format!("{year:04}-{month:02}-{day:02} 01:02:03.004"), "day {days}");
            let month_len = match month {
                2 if leap(year) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            day += 1;
            if day > month_len {
                (day, month) = (1, month + 1);
                if month > 12 {
                    (month, year) = (1, year + 1);
                }
            }
        }
    }

    #[test]
    fn reasons_compare_with_text_and_urls_give_back_their_text() {
        let r = Reason::from("going away");
        assert!(r == *"going away" && r == "going away");
        assert!(r != *"gone" && r != "gone");
        let url = WsUrl::parse("wss://example.test/socket").expect("a ws url");
        assert_eq!(url.as_str(), "wss://example.test/socket");
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(Timestamp(0).utc(), "1970-01-01 00:00:00.000");
        assert_eq!(Timestamp(951_782_400_123).utc(), "2000-02-29 00:00:00.123");
        assert_eq!(Timestamp(1_795_512_394_761).utc(), "2026-11-24 09:26:34.761");
    }

    #[test]
    fn identity_rules() {
        assert_eq!(Identity::new(""), Err(IdentityError::Empty));
        assert_eq!(Identity::new("a\nb"), Err(IdentityError::ControlChar));
        assert!(Identity::new("x".repeat(IDENTITY_LEN_MAX + 1)).is_err());
    }

    #[test]
    fn names_say_why_they_are_refused() {
        assert_eq!(InstanceName::new(""), Err(NameError::Empty));
        assert_eq!(InstanceName::new("a b"), Err(NameError::InvalidChar { name: "a b".into(), ch: ' ', index: 1 }));
        assert_eq!(InstanceName::new("-rf"), Err(NameError::BadStart { name: "-rf".into() }));
        assert_eq!(InstanceName::new(".x"), Err(NameError::BadStart { name: ".x".into() }));
        assert!(InstanceName::new("x.-_9").is_ok(), "dots, dashes and underscores inside are fine");
        let texts = [
            NameError::Empty.to_string(),
            InstanceName::new("a/b").expect_err("slash").to_string(),
            InstanceName::new("_x").expect_err("start").to_string(),
            InstanceName::new("x".repeat(65)).expect_err("long").to_string(),
        ];
        assert!(texts[0].contains("empty"));
        assert!(texts[1].contains("'/'") && texts[1].contains("byte 1"), "{}", texts[1]);
        assert!(texts[2].contains("letter or a digit"), "{}", texts[2]);
        assert!(texts[3].contains("65") && texts[3].contains("64"), "{}", texts[3]);
        let n: InstanceName = "acme".parse().expect("parse");
        assert_eq!(
            (n.as_str(), format!("{n:>6}"), format!("{n:?}")),
            ("acme", "  acme".to_owned(), "\"acme\"".to_owned())
        );
        assert_eq!(String::from(n.clone()), "acme");
        assert_eq!(InstanceName::try_from("acme".to_owned()), Ok(n));
    }

    #[test]
    fn identities_statuses_generations_and_times_print_and_bound() {
        let id = Identity::new("x".repeat(IDENTITY_LEN_MAX)).expect("at the limit");
        assert_eq!(id.as_str().len(), IDENTITY_LEN_MAX);
        assert!(matches!(
            Identity::new("x".repeat(IDENTITY_LEN_MAX + 1)),
            Err(IdentityError::TooLong { len: 257, max: 256 })
        ));
        let id = Identity::new("5511@s").expect("valid");
        assert_eq!(
            (id.to_string(), format!("{id:?}"), String::from(id.clone())),
            ("5511@s".into(), "\"5511@s\"".into(), "5511@s".into())
        );
        assert_eq!(Identity::try_from("5511@s".to_owned()), Ok(id));
        for e in [IdentityError::Empty, IdentityError::ControlChar, IdentityError::TooLong { len: 300, max: 256 }] {
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(Generation(4).next(), Generation(5));
        assert_eq!(Generation(u64::MAX).next(), Generation(u64::MAX), "saturates");
        assert_eq!(Generation(7).to_string(), "g7");
        assert_eq!(StatusCode(401).to_string(), "401");
        assert_eq!((StatusCode::NORMAL.0, StatusCode::TIMEOUT.0, StatusCode::RESTART.0), (1000, 408, 1012));
        assert_eq!(Timestamp(5).to_string(), "5ms");
        assert_eq!(Timestamp(5).saturating_add(Duration::from_millis(7)), Timestamp(12));
        assert_eq!(Timestamp(u64::MAX - 1).saturating_add(Duration::from_secs(1)), Timestamp(u64::MAX));
        assert_eq!(Timestamp(10).saturating_since(Timestamp(4)), Duration::from_millis(6));
        assert_eq!(Timestamp(4).saturating_since(Timestamp(10)), Duration::ZERO);
        assert_eq!(Timestamp(86_400_000 * 365 + 3_723_004).utc(), "1971-01-01 01:02:03.004");
    }

    #[test]
    fn reasons_and_urls_convert_and_compare() {
        let r = Reason::from("closed");
        assert_eq!((r.as_str(), r.to_string(), format!("{r:?}")), ("closed", "closed".into(), "\"closed\"".into()));
        assert!(r == "closed" && r == *"closed" && r.starts_with("clo"));
        assert_eq!(String::from(r.clone()), "closed");
        assert_eq!(Reason::from("closed".to_owned()), r);
        assert_eq!(Reason::default().as_str(), "");
        let exactly = "x".repeat(REASON_LEN_MAX);
        assert_eq!(Reason::new(exactly.clone()).as_str(), exactly, "at the limit, nothing is cut");
        let url = WsUrl::parse("ws://h/").expect("valid");
        assert_eq!(
            (url.to_string(), format!("{url:?}"), String::from(url.clone())),
            ("ws://h/".into(), "\"ws://h/\"".into(), "ws://h/".into())
        );
        assert_eq!(WsUrl::try_from("ws://h/".to_owned()), Ok(url));
        let long = format!("ws://{}", "a".repeat(URL_LEN_MAX - 5));
        assert_eq!(long.len(), URL_LEN_MAX);
        assert!(WsUrl::parse(&long).is_ok(), "at the limit");
        let e = WsUrl::parse("http://x").expect_err("scheme");
        assert!(e.to_string().contains("ws:// or wss://") && e.url == "http://x", "{e}");
        assert!(serde_json::from_str::<WsUrl>("\"http://x\"").is_err(), "serde validates too");
    }
}
