//! The AsyncAPI documents ficus generates (`ficus asyncapi`, `/asyncapi`), validated by the
//! official parser (`@asyncapi/parser`, run with Node from `tests/asyncapi/`; `.ci/run` installs
//! it with `npm ci`). Skipped with a loud message where Node or the parser is missing; a failure
//! under `CI`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn checker() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/asyncapi");
    let node = Command::new("node").arg("--version").output();
    let missing = if !node.is_ok_and(|o| o.status.success()) {
        Some("`node` is not installed")
    } else if !dir.join("node_modules/@asyncapi/parser").is_dir() {
        Some("the parser is not installed: `npm ci --prefix tests/asyncapi`")
    } else {
        None
    };
    match missing {
        None => Some(dir.join("validate.mjs")),
        Some(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "AsyncAPI validation cannot run under CI: {why}"
            );
            eprintln!("\n*** SKIPPED: AsyncAPI documents not validated: {why} ***\n");
            None
        }
    }
}

/// `ficus asyncapi -c CONFIG` written to `out`.
fn document(config: &Path, env: &[(&str, &str)], out: &Path) {
    let output = Command::new(crate::support::binary())
        .args(["asyncapi", "-c"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .expect("run ficus asyncapi");
    assert!(
        output.status.success(),
        "ficus asyncapi -c {}: {}",
        config.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(out, &output.stdout).expect("write document");
}

fn validate(checker: &Path, documents: &[PathBuf]) -> (bool, String) {
    let output = Command::new("node")
        .arg(checker)
        .args(documents)
        .output()
        .expect("run node");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), report)
}

#[test]
fn generated_documents_pass_the_official_asyncapi_parser() {
    let Some(checker) = checker() else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    // Every rule shape we ship: the demo's, the example configs', the Kubernetes ones.
    let configs = [
        ("demo", root.join("config/demo.yaml")),
        ("ficus", root.join("config/ficus.yaml")),
        (
            "deploy-base",
            root.join("deploy/kubernetes/base/ficus.yaml"),
        ),
        (
            "deploy-example",
            root.join("deploy/kubernetes/overlays/example/ficus.yaml"),
        ),
    ];
    let env = [
        ("FICUS_DEMO_SHOP", "http://127.0.0.1:1"),
        ("FICUS_DEMO_DIR", "/tmp/ficus-asyncapi-test"),
        ("NATS_URL", "nats://127.0.0.1:4222"),
    ];
    let mut documents = Vec::new();
    for (name, config) in &configs {
        let out = dir.path().join(format!("{name}.json"));
        document(config, &env, &out);
        documents.push(out);
    }
    let (ok, report) = validate(&checker, &documents);
    assert!(ok, "the official parser refused a document:\n{report}");
    assert!(
        !report.contains(": error:"),
        "errors in the parser's report:\n{report}"
    );
    eprintln!("{report}");

    // The parser bites: a document without `info` is refused.
    let text = std::fs::read_to_string(&documents[0]).expect("read");
    let mut broken: serde_json::Value = serde_json::from_str(&text).expect("json");
    broken
        .as_object_mut()
        .expect("object")
        .remove("info")
        .expect("a document has info");
    let bad = dir.path().join("broken.json");
    std::fs::write(&bad, broken.to_string()).expect("write");
    let (ok, report) = validate(&checker, &[bad]);
    assert!(!ok, "a document without info must be refused:\n{report}");
}
