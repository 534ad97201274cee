//! Route-to-event rules: which exchanges become events, and what those events say. Pure: no IO,
//! no async, no clock; the proxy calls in, the event builder takes the drafts.
//!
//! # The model
//!
//! A [`Rule`] matches on method (any when left out), a [`PathTemplate`] and a [`StatusMatch`]
//! (`2xx` by default), and optionally an `if` [`Condition`] in CEL. Its attributes (`type`,
//! `source`, `subject`, `partition_key`, `id`, `sequence`) are [`Template`]s and its `data` a
//! [`DataTemplate`], all written with `{...}` placeholders over one [`Exchange`]:
//! `request.method`, `request.path`, `request.query.NAME`, `request.headers.NAME`,
//! `request.body[.field|[index]]...`, `path.NAME`, `response.status`, `response.headers.NAME`,
//! `response.body[...]`. Every name is checked when the config loads.
//!
//! A [`RuleSet`] is used in three steps, so that the proxy pays for as little as it can:
//!
//! 1. [`RuleSet::candidates`] when the request head arrives: the rules whose method and path
//!    match, as a [`Candidates`] bit set. It allocates nothing; most requests stop here.
//! 2. [`RuleSet::needs`]: what the candidates read, so the proxy tees only the bodies a rule
//!    uses (capped at `limits.capture_body`), and [`RuleSet::any_status`] once the status is
//!    known, to drop the response capture when no candidate applies to it.
//! 3. [`RuleSet::evaluate`] when the response has ended: one [`Outcome`] per candidate, an
//!    [`EventDraft`] or the [`SkipReason`] (which `ficus rules test` prints).
//!
//! Path parameters belong to a rule, not to the exchange: two rules may match the same path
//! with different templates, so each gets its own `path` (see [`Template::eval_with`]).
//!
//! # Values
//!
//! A body is JSON when its content type says so (`application/json`, `application/*+json`),
//! otherwise its text; an empty body is `null` (see [`Captured::value`]). A placeholder that is
//! the whole string keeps the JSON type of its value; mixed with text it renders into a string
//! (`null` empty, objects and arrays as compact JSON). Anything missing is `null`. An attribute
//! that comes out `null` or empty is left out of the draft (the event builder then falls back:
//! `id` to a UUIDv7, `partition_key` to the subject, `source` to `events.source`); a `type` that
//! does so skips the rule ([`SkipReason::MissingType`]), since an event needs one. A query
//! parameter given twice reads as its first value; a repeated header as its values joined with
//! `", "`.
//!
//! `data` defaults to the response body. A draft has no data when it evaluates to `null`, which
//! covers the SPEC's "an empty body leaves `data` out".
//!
//! # Truncated bodies
//!
//! ficus keeps only the first `limits.capture_body` bytes of a body, marked truncated. A JSON
//! body cut short no longer parses and reads as missing (`null`): rules and consumers never see
//! half a document as if it were the whole. A text body reads as its prefix. The event is still
//! emitted, since the exchange happened and a state change must not go without its event; its
//! draft says [`EventDraft::data_truncated`] when `data` read (or defaulted to) a truncated
//! body, for the event builder to flag.
//!
//! # What rules can see
//!
//! [`Redactor`] (`events.redact`) removes body fields and headers before any rule runs, so no
//! expression, condition or default `data` can carry them out. `Authorization`, `Cookie` and
//! `Set-Cookie` are dropped unless a rule names them ([`Needs`]); a condition sees one only when
//! it names it itself, and a template can only read the headers it names.

mod condition;
mod exchange;
mod path;
mod redact;
mod scan;
mod status;
mod template;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderName, Method};
use serde_json::Value;

pub use condition::Condition;
pub use exchange::{Captured, Exchange};
pub use path::PathTemplate;
pub use redact::Redactor;
pub use status::StatusMatch;
pub use template::{DataTemplate, Template};

pub(crate) use scan::{plain_len, plain_string, special};

use condition::CelExchange;
use template::attribute;

/// The most rules one set holds: [`Candidates`] is a fixed bit set, so that finding them
/// allocates nothing on the request path.
pub const MAX_RULES: usize = 256;

/// Headers that carry credentials or sessions: never captured unless a rule names them.
pub const SENSITIVE_HEADERS: [HeaderName; 3] = [AUTHORIZATION, COOKIE, SET_COOKIE];

pub fn is_sensitive(name: &HeaderName) -> bool {
    SENSITIVE_HEADERS.contains(name)
}

/// What rules read from an exchange beyond its request line and status: which bodies to
/// capture, and the headers they name. The header lists also decide which of the
/// [`SENSITIVE_HEADERS`] a condition sees.
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct Needs {
    pub request_body: bool,
    pub response_body: bool,
    pub request_headers: Vec<HeaderName>,
    pub response_headers: Vec<HeaderName>,
    /// A condition may read the header maps whole (`'x-a' in request.headers`, a key built
    /// at run time), so every header but the unnamed sensitive ones must be in the exchange.
    /// Without one, templates read only the headers the lists name.
    pub header_maps: bool,
}

impl Needs {
    pub fn merge(&mut self, other: &Needs) {
        self.request_body |= other.request_body;
        self.response_body |= other.response_body;
        self.header_maps |= other.header_maps;
        for h in &other.request_headers {
            self.add_request_header(h.clone());
        }
        for h in &other.response_headers {
            self.add_response_header(h.clone());
        }
    }

    pub(crate) fn add_request_header(&mut self, name: HeaderName) {
        if !self.request_headers.contains(&name) {
            self.request_headers.push(name);
        }
    }

    pub(crate) fn add_response_header(&mut self, name: HeaderName) {
        if !self.response_headers.contains(&name) {
            self.response_headers.push(name);
        }
    }

    /// Whether a request header may go into the [`Exchange`].
    pub fn keeps_request_header(&self, name: &HeaderName) -> bool {
        !is_sensitive(name) || self.request_headers.contains(name)
    }

    /// Whether a response header may go into the [`Exchange`].
    pub fn keeps_response_header(&self, name: &HeaderName) -> bool {
        !is_sensitive(name) || self.response_headers.contains(name)
    }

    /// Removes the sensitive headers these needs do not name.
    pub fn remove_unnamed_sensitive(&self, request: &mut HeaderMap, response: &mut HeaderMap) {
        for h in &SENSITIVE_HEADERS {
            if !self.keeps_request_header(h) {
                request.remove(h);
            }
            if !self.keeps_response_header(h) {
                response.remove(h);
            }
        }
    }
}

/// One validated entry of `events.rules`.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    /// Any method when `None`.
    pub method: Option<Method>,
    pub path: PathTemplate,
    pub status: StatusMatch,
    pub condition: Option<Condition>,
    pub ty: Template,
    /// `None`: the event builder uses `events.source`.
    pub source: Option<Template>,
    pub subject: Option<Template>,
    /// `None`: the event builder falls back to the subject.
    pub partition_key: Option<Template>,
    pub id: Option<Template>,
    pub sequence: Option<Template>,
    /// `None`: the response body.
    pub data: Option<DataTemplate>,
    /// `None`: every sink.
    pub sinks: Option<Vec<String>>,
}

impl Rule {
    /// A rule with the defaults: any method, `2xx`, no condition, the response body as data.
    pub fn new(name: impl Into<String>, path: PathTemplate, ty: Template) -> Rule {
        Rule {
            name: name.into(),
            method: None,
            path,
            status: StatusMatch::default_2xx(),
            condition: None,
            ty,
            source: None,
            subject: None,
            partition_key: None,
            id: None,
            sequence: None,
            data: None,
            sinks: None,
        }
    }

    fn templates(&self) -> impl Iterator<Item = (&'static str, &Template)> {
        [
            ("source", &self.source),
            ("subject", &self.subject),
            ("partition_key", &self.partition_key),
            ("id", &self.id),
            ("sequence", &self.sequence),
        ]
        .into_iter()
        .filter_map(|(k, t)| t.as_ref().map(|t| (k, t)))
        .chain(std::iter::once(("type", &self.ty)))
    }

    /// Everything the rule reads: its templates, its condition, and its data (the response
    /// body when it has none).
    pub fn needs(&self) -> Needs {
        let mut needs = Needs::default();
        for (_, t) in self.templates() {
            needs.merge(&t.needs());
        }
        if let Some(c) = &self.condition {
            needs.merge(&c.needs());
        }
        match &self.data {
            Some(d) => needs.merge(&d.needs()),
            None => needs.response_body = true,
        }
        needs
    }

    /// Problems that need the whole rule to see: a `path.NAME` its path template does not
    /// have. Each comes with the key path of the value it is in (`subject`, `if`,
    /// `data.items[1].id`), for the config to locate.
    pub fn check(&self) -> Vec<RuleProblem> {
        let mut used: Vec<(Vec<KeyStep>, &str)> = Vec::new();
        for (key, t) in self.templates() {
            used.extend(t.path_params().map(|p| (vec![KeyStep::key(key)], p)));
        }
        if let Some(d) = &self.data {
            for (mut at, p) in d.path_params_at() {
                at.insert(0, KeyStep::key("data"));
                used.push((at, p));
            }
        }
        if let Some(c) = &self.condition {
            used.extend(c.path_params().map(|p| (vec![KeyStep::key("if")], p)));
        }
        let mut problems = Vec::new();
        for (at, p) in used {
            if !self.path.has_param(p) {
                let known: Vec<&str> = self.path.params().collect();
                let has = if known.is_empty() {
                    "it has none".to_string()
                } else {
                    format!("it has: {}", known.join(", "))
                };
                problems.push(RuleProblem {
                    at,
                    message: format!(
                        "`path.{p}` is not a parameter of the rule's path `{}` ({has})",
                        self.path
                    ),
                });
            }
        }
        problems
    }
}

/// One step of a key path into a rule as written: a mapping key or a list index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyStep {
    Key(String),
    Index(usize),
}

impl KeyStep {
    fn key(name: &str) -> KeyStep {
        KeyStep::Key(name.to_string())
    }
}

/// A problem [`Rule::check`] found, and the key path (from the rule) of the value it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleProblem {
    pub at: Vec<KeyStep>,
    pub message: String,
}

/// `RuleSet::new` was given more than [`MAX_RULES`] rules.
#[derive(Debug, thiserror::Error)]
#[error("at most {MAX_RULES} rules are supported, found {0}")]
pub struct TooManyRules(pub usize);

/// The rules of one config, with what each reads worked out once.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    compiled: Vec<Compiled>,
    redact: Redactor,
}

#[derive(Debug)]
struct Compiled {
    /// The rule's name, shared by its drafts.
    name: Arc<str>,
    /// The rule's `type` when it is a constant (most are), shared by its drafts.
    ty: Option<Arc<str>>,
    /// The rule's `sinks`, shared by its drafts.
    sinks: Option<Arc<[String]>>,
    needs: Needs,
    /// Which bodies `data` reads, for [`EventDraft::data_truncated`].
    data_request_body: bool,
    data_response_body: bool,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>, redact: Redactor) -> Result<RuleSet, TooManyRules> {
        if rules.len() > MAX_RULES {
            return Err(TooManyRules(rules.len()));
        }
        let compiled = rules
            .iter()
            .map(|r| {
                let (req, resp) = match &r.data {
                    Some(d) => {
                        let n = d.needs();
                        (n.request_body, n.response_body)
                    }
                    None => (false, true),
                };
                Compiled {
                    name: Arc::from(r.name.as_str()),
                    ty: r.ty.as_constant().filter(|t| !t.is_empty()).map(Arc::from),
                    sinks: r.sinks.as_deref().map(Arc::from),
                    needs: r.needs(),
                    data_request_body: req,
                    data_response_body: resp,
                }
            })
            .collect();
        Ok(RuleSet {
            rules,
            compiled,
            redact,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn redactor(&self) -> &Redactor {
        &self.redact
    }

    /// The rules whose method and path match. Allocates nothing: it runs on every request.
    pub fn candidates(&self, method: &Method, path: &str) -> Candidates {
        let mut c = Candidates::default();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.method.as_ref().is_some_and(|m| m != method) {
                continue;
            }
            if rule.path.matches(path) {
                c.insert(i);
            }
        }
        c
    }

    /// What the candidates read, merged.
    pub fn needs(&self, candidates: &Candidates) -> Needs {
        let mut needs = Needs::default();
        for c in candidates.iter().filter_map(|i| self.compiled.get(i)) {
            needs.merge(&c.needs);
        }
        needs
    }

    /// Whether any candidate applies to `status`; when none does, nothing of the response
    /// needs capturing.
    pub fn any_status(&self, candidates: &Candidates, status: u16) -> bool {
        candidates
            .iter()
            .filter_map(|i| self.rules.get(i))
            .any(|r| r.status.matches(status))
    }

    /// The candidates evaluated on a finished exchange, in rule order, one [`Outcome`] each.
    ///
    /// Redaction is applied first, whatever the caller did. The sensitive-header rule holds per
    /// rule whatever headers the exchange carries: a template reads only the headers it names,
    /// and a condition's view of the headers lacks the sensitive ones it does not name.
    pub fn evaluate(&self, candidates: &Candidates, ex: Exchange) -> Vec<Outcome> {
        self.evaluate_indexed(candidates, ex)
            .into_iter()
            .map(|(_, outcome)| outcome)
            .collect()
    }

    /// [`evaluate`](Self::evaluate), each outcome with the index of its rule in
    /// [`rules`](Self::rules): the tap keeps per-rule state (counters, the start of the
    /// envelope) that it need not look up by name.
    pub fn evaluate_indexed(
        &self,
        candidates: &Candidates,
        mut ex: Exchange,
    ) -> Vec<(usize, Outcome)> {
        self.redact.apply(&mut ex);
        let ex = &ex;
        // Conditions share one CEL view of the exchange, built on first use.
        let mut shared = None;
        candidates
            .iter()
            .filter_map(|i| Some((i, self.rules.get(i)?, self.compiled.get(i)?)))
            .map(|(i, rule, compiled)| (i, evaluate_rule(rule, compiled, ex, &mut shared)))
            .collect()
    }

    /// [`candidates`](Self::candidates) and [`evaluate`](Self::evaluate) in one, for offline
    /// use (`ficus rules test`).
    pub fn evaluate_exchange(&self, ex: Exchange) -> Vec<Outcome> {
        let candidates = self.candidates(&ex.method, &ex.path);
        self.evaluate(&candidates, ex)
    }
}

fn evaluate_rule<'a>(
    rule: &Rule,
    compiled: &Compiled,
    ex: &'a Exchange,
    shared: &mut Option<CelExchange<'a>>,
) -> Outcome {
    let skip = |reason| Outcome::Skipped {
        rule: rule.name.clone(),
        reason,
    };
    if !rule.status.matches(ex.status) {
        return skip(SkipReason::Status(ex.status));
    }
    // A candidate matched this path; a caller that passed another exchange gets no parameters
    // rather than a panic.
    let params = rule.path.captures(&ex.path).unwrap_or_default();
    if let Some(cond) = &rule.condition {
        let result = if cond.names_sensitive() {
            // Its own view, with the sensitive headers it names; other conditions never see them.
            cond.eval_in(&CelExchange::new(ex, &cond.needs()), &params)
        } else {
            let vars = shared.get_or_insert_with(|| CelExchange::new(ex, &Needs::default()));
            cond.eval_in(vars, &params)
        };
        match result {
            Ok(true) => {}
            Ok(false) => return skip(SkipReason::Condition),
            Err(e) => return skip(SkipReason::ConditionError(e)),
        }
    }
    let ty = match &compiled.ty {
        Some(ty) => ty.clone(),
        None => match attribute(rule.ty.eval_with(ex, &params)) {
            Some(ty) => Arc::from(ty),
            None => return skip(SkipReason::MissingType),
        },
    };
    let attr = |t: &Option<Template>| t.as_ref().and_then(|t| attribute(t.eval_with(ex, &params)));
    let (data, data_text) = match &rule.data {
        Some(d) => (Data::Value(d.eval_with(ex, &params)), false),
        // The body's own bytes when they are already what its value serialises to: the
        // value is neither built, nor copied, nor written again.
        None => match ex.response_body.canonical_json() {
            Some(json) => (Data::Json(json), false),
            None => (
                Data::Value(ex.response_body.value().clone()),
                ex.response_body.is_text(),
            ),
        },
    };
    let data_truncated = (compiled.data_request_body && ex.request_body.is_truncated())
        || (compiled.data_response_body && ex.response_body.is_truncated());
    Outcome::Emit(EventDraft {
        rule: compiled.name.clone(),
        ty,
        source: attr(&rule.source),
        subject: attr(&rule.subject),
        partition_key: attr(&rule.partition_key),
        id: attr(&rule.id),
        sequence: attr(&rule.sequence),
        data_text: data_text && data.is_string(),
        data: (!data.is_null()).then_some(data),
        data_truncated,
        sinks: compiled.sinks.clone(),
    })
}

/// A set of rule indexes, below [`MAX_RULES`]. `Copy` and allocation-free: it is computed for
/// every request and carried to the end of the exchange.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Candidates {
    bits: [u64; MAX_RULES / 64],
}

impl Candidates {
    /// Adds rule `i` (ignored past [`MAX_RULES`]).
    pub fn insert(&mut self, i: usize) {
        if let Some(word) = self.bits.get_mut(i / 64) {
            *word |= 1 << (i % 64);
        }
    }

    pub fn contains(&self, i: usize) -> bool {
        self.bits
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    pub fn len(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Rule indexes, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.bits.iter().enumerate().flat_map(|(w, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                Some(w * 64 + bit)
            })
        })
    }
}

impl fmt::Debug for Candidates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// What one candidate rule made of an exchange.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Emit(EventDraft),
    Skipped { rule: String, reason: SkipReason },
}

impl Outcome {
    pub fn rule(&self) -> &str {
        match self {
            Outcome::Emit(d) => &d.rule,
            Outcome::Skipped { rule, .. } => rule,
        }
    }
}

/// Why a rule whose method and path matched emitted nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The response status is not one the rule's `match.status` accepts.
    Status(u16),
    /// The `if` condition was false.
    Condition,
    /// The `if` condition failed to evaluate, or did not give a bool.
    ConditionError(String),
    /// A templated `type` came out null or empty (a constant one cannot: the config refuses
    /// an empty `type`).
    MissingType,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Status(s) => write!(
                f,
                "the response status {s} is not one the rule's `match.status` accepts"
            ),
            SkipReason::Condition => f.write_str("the `if` condition is false"),
            SkipReason::ConditionError(e) => write!(f, "the `if` condition failed: {e}"),
            SkipReason::MissingType => f.write_str(
                "`type` came out empty: its placeholders found nothing in this exchange",
            ),
        }
    }
}

/// An event's `data`: a JSON value, or the JSON text of one.
#[derive(Clone, Debug)]
pub enum Data {
    Value(Value),
    /// Compact JSON, byte for byte what `serde_json::to_vec` writes for the value it parses
    /// to (see [`Captured::canonical_json`]): a response body in that form goes into the event
    /// as it is.
    Json(Bytes),
}

impl Data {
    /// The value. JSON text is parsed; it is always valid (it is made only from bytes checked
    /// to be), but should it not parse, it reads as `null` rather than panic.
    pub fn to_value(&self) -> Value {
        match self {
            Data::Value(v) => v.clone(),
            Data::Json(json) => serde_json::from_slice(json).unwrap_or(Value::Null),
        }
    }

    pub fn into_value(self) -> Value {
        match self {
            Data::Value(v) => v,
            json => json.to_value(),
        }
    }

    pub fn is_null(&self) -> bool {
        match self {
            Data::Value(v) => v.is_null(),
            Data::Json(json) => json.as_ref() == b"null",
        }
    }

    pub fn is_string(&self) -> bool {
        match self {
            Data::Value(v) => v.is_string(),
            Data::Json(json) => json.first() == Some(&b'"'),
        }
    }

    /// The length of [`write_json`](Self::write_json)'s output, when known without writing
    /// it: for JSON text.
    pub fn json_len(&self) -> Option<usize> {
        match self {
            Data::Value(_) => None,
            Data::Json(json) => Some(json.len()),
        }
    }

    /// Appends the compact JSON of the data to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            // A JSON value always serialises; writing to a Vec cannot fail.
            Data::Value(v) => {
                let _ = serde_json::to_writer(out, v);
            }
            Data::Json(json) => out.extend_from_slice(json),
        }
    }
}

/// Equal when the values are: JSON text and the value it parses to are the same data.
impl PartialEq for Data {
    fn eq(&self, other: &Data) -> bool {
        match (self, other) {
            (Data::Value(a), Data::Value(b)) => a == b,
            (Data::Json(a), Data::Json(b)) if a == b => true,
            _ => self.to_value() == other.to_value(),
        }
    }
}

impl From<Value> for Data {
    fn from(v: Value) -> Data {
        Data::Value(v)
    }
}

/// An event as a rule made it; the event builder adds `specversion`, `time`, the defaults
/// (`id`, `source`, `partitionkey`), `datacontenttype` and the extensions.
#[derive(Clone, Debug, PartialEq)]
pub struct EventDraft {
    /// Shared with the rule set (and `ty` too when constant): a draft per event copies no
    /// strings of the rule.
    pub rule: Arc<str>,
    pub ty: Arc<str>,
    pub source: Option<String>,
    pub subject: Option<String>,
    pub partition_key: Option<String>,
    pub id: Option<String>,
    pub sequence: Option<String>,
    /// `None` when the data came out `null`, e.g. no `data` and an empty response body.
    pub data: Option<Data>,
    /// `data` read (or defaulted to) a body longer than `limits.capture_body`.
    pub data_truncated: bool,
    /// `data` is the text of a non-JSON response body (the default data): `text/plain`.
    /// Otherwise data is JSON.
    pub data_text: bool,
    /// The rule's `sinks`, shared with the rule set.
    pub sinks: Option<Arc<[String]>>,
}
