//! Rule sets end to end: candidates, needs, evaluation into drafts and skip reasons.

use bytes::Bytes;
use http::header::{AUTHORIZATION, COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Method};
use serde_json::{json, Value};

use super::*;

fn template(s: &str) -> Template {
    Template::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn rule(name: &str, method: Option<Method>, path: &str, ty: &str) -> Rule {
    let mut r = Rule::new(
        name,
        PathTemplate::parse(path).unwrap_or_else(|e| panic!("{path}: {e}")),
        template(ty),
    );
    r.method = method;
    r
}

fn set(rules: Vec<Rule>) -> RuleSet {
    RuleSet::new(rules, Redactor::default()).expect("few rules")
}

fn json_body(v: Value) -> Captured {
    Captured::new(
        Bytes::from(v.to_string()),
        Some(&HeaderValue::from_static("application/json")),
        false,
    )
}

fn order_created() -> Rule {
    let mut r = rule(
        "order-created",
        Some(Method::POST),
        "/orders",
        "shop.order.created",
    );
    r.status = StatusMatch::parse_one("201").expect("status");
    r.condition = Some(Condition::compile("response.body.total > 0").expect("cel"));
    r.subject = Some(template("{response.body.id}"));
    r.partition_key = Some(template("customer-{request.body.customer_id}"));
    r.id = Some(template("{request.headers.idempotency-key}"));
    r.sequence = Some(template("{response.body.version}"));
    r.data = Some(
        DataTemplate::from_json(&json!({
            "order_id": "{response.body.id}",
            "customer": "{request.body.customer_id}",
            "total": "{response.body.total}",
        }))
        .expect("data"),
    );
    r.sinks = Some(vec!["bus".into(), "audit".into()]);
    r
}

fn order_exchange() -> Exchange {
    let mut ex = Exchange::new(Method::POST, "/orders", 201);
    ex.request_headers
        .insert("idempotency-key", HeaderValue::from_static("k-1"));
    ex.request_headers
        .insert(AUTHORIZATION, HeaderValue::from_static("Bearer secret"));
    ex.request_headers
        .insert(COOKIE, HeaderValue::from_static("sid=s3cr3t"));
    ex.request_body = json_body(json!({"customer_id": "c-9", "password": "hunter2"}));
    ex.response_headers
        .insert(SET_COOKIE, HeaderValue::from_static("sid=new"));
    ex.response_body = json_body(json!({"id": 42, "total": 12.5, "version": 3}));
    ex
}

fn emitted(outcomes: Vec<Outcome>) -> Vec<EventDraft> {
    outcomes
        .into_iter()
        .map(|o| match o {
            Outcome::Emit(d) => d,
            other => panic!("expected an event, got {other:?}"),
        })
        .collect()
}

fn one_event(rules: &RuleSet, ex: Exchange) -> EventDraft {
    let mut events = emitted(rules.evaluate_exchange(ex));
    assert_eq!(events.len(), 1, "{events:?}");
    events.remove(0)
}

fn skipped(rules: &RuleSet, ex: Exchange) -> SkipReason {
    match rules.evaluate_exchange(ex).as_slice() {
        [Outcome::Skipped { reason, .. }] => reason.clone(),
        other => panic!("expected one skip, got {other:?}"),
    }
}

#[test]
fn a_typical_rule_emits_its_draft() {
    let rules = set(vec![order_created()]);
    let d = one_event(&rules, order_exchange());
    assert_eq!(
        d,
        EventDraft {
            rule: "order-created".into(),
            ty: "shop.order.created".into(),
            source: None,
            subject: Some("42".into()),
            partition_key: Some("customer-c-9".into()),
            id: Some("k-1".into()),
            sequence: Some("3".into()),
            data: Some(json!({"order_id": 42, "customer": "c-9", "total": 12.5}).into()),
            data_truncated: false,
            data_text: false,
            sinks: Some(vec!["bus".to_string(), "audit".to_string()].into()),
        }
    );
}

#[test]
fn null_attributes_are_left_out() {
    let mut r = rule("r", None, "/orders", "shop.order.created");
    r.subject = Some(template("{response.body.nope}"));
    r.id = Some(template("{request.headers.idempotency-key}"));
    r.source = Some(template("/shop/{request.query.region}"));
    r.partition_key = Some(template("{request.query.none}"));
    let mut ex = order_exchange();
    ex.request_headers.remove("idempotency-key");
    ex.query = Some("region=eu".into());
    let d = one_event(&set(vec![r]), ex);
    assert_eq!(d.subject, None);
    assert_eq!(d.id, None);
    assert_eq!(d.partition_key, None);
    assert_eq!(d.source.as_deref(), Some("/shop/eu"));
    assert_eq!(d.sinks, None);
}

#[test]
fn every_skip_reason() {
    let rules = set(vec![order_created()]);

    let mut ex = order_exchange();
    ex.status = 200;
    assert_eq!(skipped(&rules, ex), SkipReason::Status(200));

    let mut ex = order_exchange();
    ex.response_body = json_body(json!({"id": 42, "total": 0}));
    assert_eq!(skipped(&rules, ex), SkipReason::Condition);

    let mut ex = order_exchange();
    ex.response_body = json_body(json!({"id": 42}));
    match skipped(&rules, ex) {
        SkipReason::ConditionError(e) => assert!(e.contains("no such key: total"), "{e}"),
        other => panic!("{other:?}"),
    }

    let mut r = rule("typed", None, "/orders", "{response.body.kind}");
    let rules = set(vec![r]);
    assert_eq!(skipped(&rules, order_exchange()), SkipReason::MissingType);
    r = rule("typed", None, "/orders", "{request.query.kind}");
    let mut ex = order_exchange();
    ex.query = Some("kind=".into());
    assert_eq!(skipped(&set(vec![r]), ex), SkipReason::MissingType);

    let r = rule("typed", None, "/orders", "shop.{response.body.kind}");
    assert_eq!(
        &*one_event(&set(vec![r]), order_exchange()).ty,
        "shop.",
        "a type with text is never empty"
    );

    let mut r = rule("nonbool", None, "/orders", "t");
    r.condition = Some(Condition::compile("response.body.id").expect("cel"));
    match skipped(&set(vec![r]), order_exchange()) {
        SkipReason::ConditionError(e) => assert!(e.contains("must give true or false"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn skip_reasons_read_well() {
    assert_eq!(
        SkipReason::Status(404).to_string(),
        "the response status 404 is not one the rule's `match.status` accepts"
    );
    assert_eq!(
        SkipReason::Condition.to_string(),
        "the `if` condition is false"
    );
    assert_eq!(
        SkipReason::ConditionError("no such key: total".into()).to_string(),
        "the `if` condition failed: no such key: total"
    );
    assert!(SkipReason::MissingType
        .to_string()
        .starts_with("`type` came out empty"));
}

#[test]
fn candidates_by_method_and_path() {
    let rules = set(vec![
        rule("create", Some(Method::POST), "/orders", "a"),
        rule("cancel", Some(Method::DELETE), "/orders/{id}", "b"),
        rule("any-order", None, "/orders/{*rest}", "c"),
        rule("update", Some(Method::PUT), "/orders/{id}", "d"),
    ]);
    let ids = |m: Method, p: &str| rules.candidates(&m, p).iter().collect::<Vec<_>>();
    assert_eq!(ids(Method::POST, "/orders"), [0, 2]);
    assert_eq!(ids(Method::DELETE, "/orders/7"), [1, 2]);
    assert_eq!(ids(Method::PUT, "/orders/7"), [2, 3]);
    assert_eq!(ids(Method::GET, "/orders/7/items"), [2]);
    assert!(rules.candidates(&Method::GET, "/health").is_empty());
    assert!(rules.candidates(&Method::POST, "/order").is_empty());
    let c = rules.candidates(&Method::DELETE, "/orders/7");
    assert_eq!(c.len(), 2);
    assert!(c.contains(1) && !c.contains(0));
    assert_eq!(format!("{c:?}"), "{1, 2}");
    // Copy: the proxy keeps it while the request streams.
    let copy = c;
    assert_eq!(copy, c);
    assert!(RuleSet::default().is_empty());
    assert!(RuleSet::default().candidates(&Method::GET, "/").is_empty());
}

#[test]
fn candidates_beyond_the_first_word() {
    let mut rules: Vec<Rule> = (0..200)
        .map(|i| rule(&format!("r{i}"), None, &format!("/r{i}"), "t"))
        .collect();
    rules.push(rule("last", None, "/r150", "t"));
    let rules = set(rules);
    let c = rules.candidates(&Method::GET, "/r150");
    assert_eq!(c.iter().collect::<Vec<_>>(), [150, 200]);
    let names: Vec<String> = rules
        .evaluate(&c, Exchange::new(Method::GET, "/r150", 200))
        .iter()
        .map(|o| o.rule().to_string())
        .collect();
    assert_eq!(names, ["r150", "last"]);

    let too_many: Vec<Rule> = (0..=MAX_RULES)
        .map(|i| rule(&format!("r{i}"), None, "/", "t"))
        .collect();
    let err = RuleSet::new(too_many, Redactor::default()).expect_err("too many");
    assert_eq!(
        err.to_string(),
        "at most 256 rules are supported, found 257"
    );
}

#[test]
fn any_status_looks_at_the_candidates_only() {
    let mut created = rule("created", Some(Method::POST), "/orders", "a");
    created.status = StatusMatch::parse_one("201").expect("status");
    let mut failed = rule("failed", Some(Method::POST), "/orders", "b");
    failed.status = StatusMatch::parse_one("5xx").expect("status");
    let mut other = rule("other", Some(Method::GET), "/orders", "c");
    other.status = StatusMatch::parse_one("404").expect("status");
    let rules = set(vec![created, failed, other]);
    let c = rules.candidates(&Method::POST, "/orders");
    assert!(rules.any_status(&c, 201));
    assert!(rules.any_status(&c, 503));
    assert!(!rules.any_status(&c, 200));
    assert!(!rules.any_status(&c, 404), "only a GET rule takes 404");
    assert!(!rules.any_status(&Candidates::default(), 201));
}

#[test]
fn needs_of_the_candidates() {
    let mut headers_only = rule("h", Some(Method::GET), "/orders/{id}", "t");
    headers_only.subject = Some(template("{path.id}"));
    headers_only.data = Some(DataTemplate::from_json(&json!({"id": "{path.id}"})).expect("data"));
    let rules = set(vec![order_created(), headers_only]);

    let n = rules.needs(&rules.candidates(&Method::POST, "/orders"));
    assert!(n.request_body && n.response_body);
    assert_eq!(
        n.request_headers,
        [http::HeaderName::from_static("idempotency-key")]
    );
    assert!(!n.keeps_request_header(&AUTHORIZATION));
    assert!(n.keeps_request_header(&http::HeaderName::from_static("x-other")));

    let n = rules.needs(&rules.candidates(&Method::GET, "/orders/1"));
    assert!(!n.request_body && !n.response_body, "{n:?}");

    // Without `data`, the response body is the data.
    let n = set(vec![rule("d", None, "/", "t")]).needs(&Candidates { bits: [1, 0, 0, 0] });
    assert!(n.response_body && !n.request_body);
    assert_eq!(Needs::default(), rules.needs(&Candidates::default()));
}

#[test]
fn default_data_is_the_response_body() {
    let rules = set(vec![rule("r", None, "/orders", "t")]);
    let d = one_event(&rules, order_exchange());
    assert_eq!(
        d.data,
        Some(json!({"id": 42, "total": 12.5, "version": 3}).into())
    );
    assert!(!d.data_text);

    // An empty body leaves data out.
    let mut ex = order_exchange();
    ex.response_body = Captured::empty();
    assert_eq!(one_event(&rules, ex).data, None);

    // A text body is text.
    let mut ex = order_exchange();
    ex.response_body = Captured::new(
        Bytes::from_static(b"created"),
        Some(&HeaderValue::from_static("text/plain")),
        false,
    );
    let d = one_event(&rules, ex);
    assert_eq!(d.data, Some(json!("created").into()));
    assert!(d.data_text);

    // A JSON body that is a string is JSON, not text.
    let mut ex = order_exchange();
    ex.response_body = json_body(json!("created"));
    let d = one_event(&rules, ex);
    assert_eq!(d.data, Some(json!("created").into()));
    assert!(!d.data_text);

    // An explicit data template is JSON even when it copies a text body.
    let mut r = rule("r", None, "/orders", "t");
    r.data = Some(DataTemplate::from_json(&json!("{response.body}")).expect("data"));
    let mut ex = order_exchange();
    ex.response_body = Captured::new(Bytes::from_static(b"created"), None, false);
    let d = one_event(&set(vec![r]), ex);
    assert_eq!(d.data, Some(json!("created").into()));
    assert!(!d.data_text);
}

#[test]
fn truncated_bodies_still_emit_and_say_so() {
    let json_ct = HeaderValue::from_static("application/json");
    let cut = || {
        Captured::new(
            Bytes::from_static(b"{\"id\": 42, \"tot"),
            Some(&json_ct),
            true,
        )
    };

    // Default data from a cut JSON body: missing, flagged, still emitted.
    let rules = set(vec![rule("r", None, "/orders", "t")]);
    let mut ex = order_exchange();
    ex.response_body = cut();
    let d = one_event(&rules, ex);
    assert_eq!(d.data, None);
    assert!(d.data_truncated);

    // A truncated text body gives its prefix, flagged.
    let mut ex = order_exchange();
    ex.response_body = Captured::new(Bytes::from_static(b"partial te"), None, true);
    let d = one_event(&rules, ex);
    assert_eq!(d.data, Some(json!("partial te").into()));
    assert!(d.data_truncated && d.data_text);

    // A truncated JSON body that still parses (the cut fell on its end) reads whole, flagged.
    let mut ex = order_exchange();
    ex.response_body = Captured::new(Bytes::from_static(b"{\"id\": 42}"), Some(&json_ct), true);
    let d = one_event(&rules, ex);
    assert_eq!(d.data, Some(json!({"id": 42}).into()));
    assert!(d.data_truncated);

    // Expressions into a cut body are null.
    let mut r = order_created();
    r.condition = None;
    let rules = set(vec![r]);
    let mut ex = order_exchange();
    ex.request_body = cut();
    let d = one_event(&rules, ex);
    assert_eq!(
        d.data,
        Some(json!({"order_id": 42, "customer": null, "total": 12.5}).into())
    );
    assert_eq!(d.partition_key.as_deref(), Some("customer-"));
    assert!(d.data_truncated, "data read the truncated request body");

    // Data that reads no truncated body is not flagged, even if a body was cut.
    let mut r = rule("r", None, "/orders", "t");
    r.data = Some(DataTemplate::from_json(&json!({"id": "{response.body.id}"})).expect("data"));
    let mut ex = order_exchange();
    ex.request_body = cut();
    let d = one_event(&set(vec![r]), ex);
    assert!(!d.data_truncated);
}

#[test]
fn path_parameters_are_per_rule() {
    let mut by_id = rule("by-id", Some(Method::DELETE), "/orders/{id}", "cancelled");
    by_id.subject = Some(template("{path.id}"));
    let mut by_rest = rule("by-rest", None, "/{*rest}", "any");
    by_rest.subject = Some(template("{path.rest}"));
    let mut id_in_if = rule("if", None, "/orders/{order}", "iffed");
    id_in_if.condition = Some(Condition::compile("path.order == 'a b'").expect("cel"));
    let rules = set(vec![by_id, by_rest, id_in_if]);
    let events =
        emitted(rules.evaluate_exchange(Exchange::new(Method::DELETE, "/orders/a%20b", 204)));
    let subjects: Vec<_> = events.iter().map(|e| e.subject.as_deref()).collect();
    assert_eq!(subjects, [Some("a b"), Some("orders/a b"), None]);
}

#[test]
fn sensitive_headers_are_absent_unless_named() {
    // A condition that looks for any auth-ish header without naming one sees none.
    let mut blind = rule("blind", None, "/orders", "t");
    blind.condition = Some(
        Condition::compile(
            "!request.headers.exists(k, k.startsWith('auth') || k.endsWith('ookie'))",
        )
        .expect("cel"),
    );
    // Another rule naming Authorization in a template does not open it to the first.
    let mut named = rule("named", None, "/orders", "t");
    named.subject = Some(template("{request.headers.authorization}"));
    let mut cookie = rule("cookie", None, "/orders", "t");
    cookie.condition = Some(Condition::compile("has(request.headers.cookie)").expect("cel"));
    let mut no_set_cookie = rule("no-set-cookie", None, "/orders", "t");
    no_set_cookie.condition =
        Some(Condition::compile("response.headers.exists(k, k.endsWith('ookie'))").expect("cel"));
    let rules = set(vec![blind, named, cookie, no_set_cookie]);
    let outcomes = rules.evaluate_exchange(order_exchange());
    assert!(
        matches!(&outcomes[0], Outcome::Emit(_)),
        "{:?}",
        outcomes[0]
    );
    match &outcomes[1] {
        Outcome::Emit(d) => assert_eq!(d.subject.as_deref(), Some("Bearer secret")),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(&outcomes[2], Outcome::Emit(_)),
        "{:?}",
        outcomes[2]
    );
    assert_eq!(
        outcomes[3],
        Outcome::Skipped {
            rule: "no-set-cookie".into(),
            reason: SkipReason::Condition
        }
    );

    // The proxy's side of the rule.
    let needs = rules.needs(&rules.candidates(&Method::POST, "/orders"));
    assert!(needs.keeps_request_header(&AUTHORIZATION));
    assert!(needs.keeps_request_header(&COOKIE));
    assert!(!needs.keeps_response_header(&SET_COOKIE));
    let mut req = HeaderMap::new();
    let mut resp = HeaderMap::new();
    req.insert(AUTHORIZATION, HeaderValue::from_static("a"));
    req.insert(COOKIE, HeaderValue::from_static("c"));
    resp.insert(SET_COOKIE, HeaderValue::from_static("s"));
    resp.insert("etag", HeaderValue::from_static("e"));
    Needs::default().remove_unnamed_sensitive(&mut req, &mut resp);
    assert!(req.is_empty());
    assert_eq!(resp.len(), 1);
}

#[test]
fn redaction_applies_before_every_rule() {
    let redact = Redactor::parse(&[
        "request.body.password".to_string(),
        "response.body.version".to_string(),
        "request.headers.idempotency-key".to_string(),
    ])
    .expect("redact");
    let mut leak = rule("leak", None, "/orders", "t");
    leak.subject = Some(template("{request.body.password}"));
    leak.id = Some(template("{request.headers.idempotency-key}"));
    leak.condition = Some(Condition::compile("!has(request.body.password)").expect("cel"));
    let default_data = rule("default", None, "/orders", "t");
    let rules = RuleSet::new(vec![leak, default_data], redact).expect("rules");
    let events = emitted(rules.evaluate_exchange(order_exchange()));
    assert_eq!(events[0].subject, None);
    assert_eq!(events[0].id, None);
    assert_eq!(
        events[1].data,
        Some(json!({"id": 42, "total": 12.5}).into())
    );
}

/// A response body already in serde_json's compact form becomes the data as it is; any other
/// form, and any body redaction touched, goes through the parsed value.
#[test]
fn default_data_keeps_a_canonical_body_as_it_is() {
    let json = HeaderValue::from_static("application/json");
    let body =
        |text: &'static str| Captured::new(Bytes::from_static(text.as_bytes()), Some(&json), false);
    let rules = set(vec![rule("r", None, "/orders", "t")]);
    let mut ex = order_exchange();
    ex.response_body = body(r#"{"id":42,"status":"accepted"}"#);
    let d = one_event(&rules, ex);
    assert!(
        matches!(&d.data, Some(Data::Json(b)) if b.as_ref() == br#"{"id":42,"status":"accepted"}"#),
        "{:?}",
        d.data
    );
    // The same document with a space, or keys out of order: the value, rewritten.
    for text in [
        r#"{"id": 42,"status":"accepted"}"#,
        r#"{"status":"accepted","id":42}"#,
    ] {
        let mut ex = order_exchange();
        ex.response_body = body(text);
        let d = one_event(&rules, ex);
        assert!(matches!(&d.data, Some(Data::Value(_))), "{text}");
        assert_eq!(d.data, Some(json!({"id": 42, "status": "accepted"}).into()));
    }
    // `null` is no data, as ever.
    let mut ex = order_exchange();
    ex.response_body = body("null");
    assert_eq!(one_event(&rules, ex).data, None);
    // Redaction edits the value: the bytes, which still hold the field, are not used.
    let redact = Redactor::parse(&["response.body.status".to_string()]).expect("redact");
    let rules = RuleSet::new(vec![rule("r", None, "/orders", "t")], redact).expect("rules");
    let mut ex = order_exchange();
    ex.response_body = body(r#"{"id":42,"status":"accepted"}"#);
    let d = one_event(&rules, ex);
    assert!(matches!(&d.data, Some(Data::Value(_))));
    assert_eq!(d.data, Some(json!({"id": 42}).into()));
}

#[test]
fn rule_check_finds_unknown_path_parameters_at_their_values() {
    let mut r = rule("r", None, "/orders/{id}", "t.{path.kind}");
    r.subject = Some(template("{path.id}"));
    r.data = Some(
        DataTemplate::from_json(
            &json!({"x": "{path.nope}", "y": [1, {"z": "{path.id} {path.w}"}]}),
        )
        .expect("data"),
    );
    r.condition = Some(Condition::compile("path.other == '1'").expect("cel"));
    let problem = |at: &[KeyStep], p: &str| RuleProblem {
        at: at.to_vec(),
        message: format!(
            "`path.{p}` is not a parameter of the rule's path `/orders/{{id}}` (it has: id)"
        ),
    };
    let key = |k: &str| KeyStep::Key(k.to_string());
    assert_eq!(
        r.check(),
        [
            problem(&[key("type")], "kind"),
            problem(&[key("data"), key("x")], "nope"),
            problem(&[key("data"), key("y"), KeyStep::Index(1), key("z")], "w"),
            problem(&[key("if")], "other"),
        ]
    );
    let r = rule("r", None, "/orders", "{path.id}");
    assert_eq!(
        r.check()[0].message,
        "`path.id` is not a parameter of the rule's path `/orders` (it has none)"
    );
    assert!(order_created().check().is_empty());
}

#[test]
fn rule_sets_cross_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RuleSet>();
    assert_send_sync::<Exchange>();
    assert_send_sync::<Outcome>();
}
