//! The client CLI as scripts use it, on the real binary: the exit-code table (each code provoked
//! for real), the list commands paging over more than one page, table output with human times,
//! and shell completions.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_mesh::proto::v1 as pb;
use baton_store::Backend;
use baton_tests::{ADMIN_TOKEN, Server, TempDir, TestOrg, authed, backends, baton_bin, create_org, record};
use serde_json::{Value, json};

/// What a `baton` run left: its exit code, stdout and stderr.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Its stdout as JSON lines.
    fn json_lines(&self) -> Vec<Value> {
        self.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    }
}

/// Runs `baton args` with `env` (and none of the `BATON_*` variables of the test's own
/// environment that would change it), and waits at most 60 s for it.
fn baton(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(baton_bin());
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for var in ["BATON_ENDPOINT", "BATON_API_KEY", "BATON_ADMIN_TOKEN", "BATON_OUTPUT", "BATON_STORE"] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    let mut child = command.spawn().expect("start baton");
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = r.read_to_string(&mut text);
            text
        })
    };
    let stdout = pipe(Box::new(child.stdout.take().unwrap()));
    let stderr = pipe(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("baton {args:?} did not end within 60s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run { code: status.code(), stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// The environment of an org's commands against `server`.
fn org_env(server: &Server, org: &TestOrg) -> Vec<(&'static str, String)> {
    vec![("BATON_ENDPOINT", format!("http://{}", server.addr)), ("BATON_API_KEY", org.key.clone())]
}

/// `baton args` as `org` against `server`.
fn as_org(server: &Server, org: &TestOrg, args: &[&str]) -> Run {
    let env = org_env(server, org);
    baton(args, &env.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>())
}

/// `baton args` with the admin token against `server`.
fn as_admin(server: &Server, args: &[&str]) -> Run {
    let endpoint = format!("http://{}", server.addr);
    baton(args, &[("BATON_ENDPOINT", &endpoint), ("BATON_ADMIN_TOKEN", ADMIN_TOKEN)])
}

/// Asserts the run exited with `code`, saying why it did not.
fn assert_exit(run: &Run, code: i32, what: &str) {
    assert_eq!(run.code, Some(code), "{what}: {run:#?}");
}

/// An NDJSON file of accounts `prefix0..n` in `dir`, with `bad` (indexes) missing their
/// required name.
fn accounts_file(dir: &TempDir, prefix: &str, n: usize, bad: &[usize]) -> String {
    let lines: Vec<String> = (0..n)
        .map(|i| match bad.contains(&i) {
            true => json!({"code": format!("{prefix}{i}")}).to_string(),
            false => json!({"code": format!("{prefix}{i}"), "name": "n", "amount": i}).to_string(),
        })
        .collect();
    let path = dir.path().join(format!("{prefix}.ndjson"));
    std::fs::write(&path, lines.join("\n")).unwrap();
    path.display().to_string()
}

/// Every code of the table, provoked for real: success 0, usage 64 (an unknown flag, a missing
/// argument named in the one line, a command without its subcommand), invalid argument 65, not
/// found 66 (an unknown batch, a missing input file), unauthenticated 77 (a made-up key, a wrong
/// admin token), unavailable 69 (no server), a batch with aborted chunks 2, a cancelled batch
/// 130; and `baton --help` shows the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_follow_the_table() {
    let help = baton(&["--help"], &[]);
    assert_exit(&help, 0, "--help");
    for line in ["Exit codes:", "  0  success", " 64  usage", " 66  not found", " 69  unavailable", "130  cancelled"] {
        assert!(help.stdout.contains(line), "--help lacks {line:?}:\n{}", help.stdout);
    }

    // usage: before any server is involved
    let unknown = baton(&["batch", "list", "--no-such-flag"], &[]);
    assert_exit(&unknown, 64, "an unknown flag");
    assert_eq!(unknown.stderr.trim_end().lines().count(), 1, "{}", unknown.stderr);
    assert!(unknown.stderr.contains("--no-such-flag"), "{}", unknown.stderr);
    let missing = baton(&["admin", "--admin-token", "t", "key", "create"], &[]);
    assert_exit(&missing, 64, "a missing argument");
    assert_eq!(missing.stderr.trim_end().lines().count(), 1, "{}", missing.stderr);
    assert!(missing.stderr.contains("were not provided: --org <ORG>"), "{}", missing.stderr);
    let two = baton(&["batch", "--api-key", "k", "submit"], &[]);
    assert_exit(&two, 64, "two missing arguments");
    assert!(two.stderr.contains("<FILE>") && two.stderr.contains("--object <OBJECT>"), "{}", two.stderr);
    let bare = baton(&["batch"], &[]);
    assert_exit(&bare, 64, "a command without anything");
    assert!(bare.stderr.contains("Usage:") && bare.stdout.is_empty(), "its help on stderr: {bare:#?}");
    let bare = baton(&["batch", "--api-key", "k"], &[]);
    assert_exit(&bare, 64, "a command without its subcommand");
    assert_eq!(bare.stderr.trim_end().lines().count(), 1, "{}", bare.stderr);
    assert!(bare.stderr.contains("requires a subcommand") && bare.stderr.contains("list"), "{}", bare.stderr);
    let no_key = baton(&["sync", "link", "list"], &[]);
    assert_exit(&no_key, 64, "no API key");

    // unavailable: nothing listens there
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nowhere = format!("http://127.0.0.1:{port}");
    let down = baton(&["batch", "list"], &[("BATON_ENDPOINT", &nowhere), ("BATON_API_KEY", "bk_x")]);
    assert_exit(&down, 69, "no server");
    assert!(down.stderr.contains("cannot connect to"), "{}", down.stderr);

    let server = Server::start(Backend::Sqlite, &["--workers", "1"]).await;
    let org = create_org(&server, "acme").await;
    let dir = TempDir::new();

    let ok = as_org(&server, &org, &["batch", "list"]);
    assert_exit(&ok, 0, "an empty list");

    // not found: an unknown batch, a file that is not there
    let unknown_batch = as_org(&server, &org, &["batch", "get", "bat_0000000000000000"]);
    assert_exit(&unknown_batch, 66, "an unknown batch");
    assert!(unknown_batch.stderr.contains("BATCH_NOT_FOUND"), "{}", unknown_batch.stderr);
    let no_file = dir.path().join("absent.ndjson").display().to_string();
    assert_exit(&as_org(&server, &org, &["batch", "submit", &no_file, "--object", "account"]), 66, "a missing file");

    // unauthenticated: a made-up key, a wrong admin token
    let stranger = TestOrg { key: "bk_made_up".into(), ..org.clone() };
    assert_exit(&as_org(&server, &stranger, &["get", "account", "a1"]), 77, "a made-up key");
    let endpoint = format!("http://{}", server.addr);
    let wrong_admin = baton(&["admin", "org", "list"], &[("BATON_ENDPOINT", &endpoint), ("BATON_ADMIN_TOKEN", "nope")]);
    assert_exit(&wrong_admin, 77, "a wrong admin token");

    // invalid argument: a filter that does not parse, a file line that is not JSON
    let bad_filter = as_org(&server, &org, &["query", "account", "--filter", "amount >"]);
    assert_exit(&bad_filter, 65, "a bad filter");
    assert!(bad_filter.stderr.contains("InvalidArgument"), "{}", bad_filter.stderr);
    let not_json = dir.path().join("not.ndjson");
    std::fs::write(&not_json, "{\"code\": \"a\"}\nnot json\n").unwrap();
    let not_json = not_json.display().to_string();
    assert_exit(&as_org(&server, &org, &["upsert", "account", "--file", &not_json]), 65, "a line that is not JSON");

    // a batch whose invalid record aborts its chunk: 2, the others committed
    let file = accounts_file(&dir, "b", 6, &[4]);
    let aborted = as_org(&server, &org, &["batch", "submit", &file, "--object", "account", "--chunk-size", "2"]);
    assert_exit(&aborted, 2, "a batch with an aborted chunk");
    let batch_id = aborted.stdout.trim().to_owned();
    assert!(batch_id.starts_with("bat_"), "{aborted:#?}");
    assert!(aborted.stderr.contains("4 of 6 records committed in 3 chunks"), "{}", aborted.stderr);
    assert!(aborted.stderr.contains("1 chunk aborted") && aborted.stderr.contains("--aborted"), "{}", aborted.stderr);
    assert_exit(&as_org(&server, &org, &["batch", "watch", &batch_id]), 2, "watching it again");
    // reading it is not following it: 0
    let got = as_org(&server, &org, &["batch", "get", &batch_id]);
    assert_exit(&got, 0, "batch get");
    assert_eq!(got.json_lines()[0]["aborted"], 1);
    let results = as_org(&server, &org, &["batch", "results", &batch_id, "--aborted"]);
    assert_eq!(results.json_lines()[0]["errors"][0]["index"], 4, "{results:#?}");

    // a batch of good records: 0
    let good = accounts_file(&dir, "g", 3, &[]);
    assert_exit(&as_org(&server, &org, &["batch", "submit", &good, "--object", "account"]), 0, "a good batch");

    // a completion webhook: a bad URL is 65 with the field named; a good one shows in `batch get`
    let hooked =
        |url: &str| as_org(&server, &org, &["batch", "submit", &good, "--object", "account", "--webhook", url]);
    let bad_hook = hooked("ftp://hooks.example.com/baton");
    assert_exit(&bad_hook, 65, "a webhook that is not http or https");
    assert!(bad_hook.stderr.contains("header.completion.webhook_url"), "{}", bad_hook.stderr);
    let hooked = hooked("https://hooks.example.com/baton");
    assert_exit(&hooked, 0, "a batch with a webhook");
    let got = as_org(&server, &org, &["batch", "get", hooked.stdout.trim()]);
    let completion = &got.json_lines()[0]["completion"];
    assert_eq!(completion["webhook_url"], "https://hooks.example.com/baton", "{got:#?}");
    // this server has no --webhook-secret: the attempts fail, saying so, until one is set
    assert!(["WAITING", "PENDING"].contains(&completion["state"].as_str().unwrap_or_default()), "{got:#?}");

    // cancelled: a batch held back an hour, cancelled, then followed
    let held =
        as_org(&server, &org, &["batch", "submit", &good, "--object", "account", "--not-before", "1h", "--no-wait"]);
    assert_exit(&held, 0, "a held batch");
    let held_id = held.stdout.trim().to_owned();
    assert_exit(&as_org(&server, &org, &["batch", "cancel", &held_id]), 0, "batch cancel");
    let watched = as_org(&server, &org, &["batch", "watch", &held_id]);
    assert_exit(&watched, 130, "a cancelled batch");
    assert!(watched.stderr.contains("was cancelled: 1 chunk never ran"), "{}", watched.stderr);
}

/// `batch list`, `export list` and `admin key list` page over more items than a page: the first
/// page says how to get the next, `--page-token` continues exactly there, `--all` follows every
/// page; newest first (keys oldest first), each item once, another org's never; keys without
/// their secrets. A table shows the same items with human times. On both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_commands_page_and_print_tables() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::start(backend, &["--workers", "1"]).await;
        let org = create_org(&server, "acme").await;
        let other = create_org(&server, "other").await;
        let dir = TempDir::new();

        // five batches, held back so that they stay as submitted
        let file = accounts_file(&dir, "a", 3, &[]);
        let mut submitted = Vec::new();
        for _ in 0..5 {
            let run = as_org(
                &server,
                &org,
                &["batch", "submit", &file, "--object", "account", "--no-wait", "--not-before", "1h"],
            );
            assert_exit(&run, 0, "batch submit");
            submitted.push(run.stdout.trim().to_owned());
        }
        assert_exit(
            &as_org(&server, &other, &["batch", "submit", &file, "--object", "account", "--no-wait"]),
            0,
            "other",
        );

        let first = as_org(&server, &org, &["batch", "list", "--page-size", "2"]);
        assert_exit(&first, 0, "the first page");
        let ids = |run: &Run, key: &str| -> Vec<String> {
            run.json_lines().iter().map(|l| l[key].as_str().unwrap().to_owned()).collect()
        };
        let newest_first: Vec<String> = submitted.iter().rev().cloned().collect();
        assert_eq!(ids(&first, "batch_id"), newest_first[..2]);
        let token = first.stderr.split("--page-token ").nth(1).and_then(|t| t.split_whitespace().next());
        let token = token.unwrap_or_else(|| panic!("no next page token in {}", first.stderr)).to_owned();
        let second = as_org(&server, &org, &["batch", "list", "--page-size", "2", "--page-token", &token]);
        assert_eq!(ids(&second, "batch_id"), newest_first[2..4]);
        let all = as_org(&server, &org, &["batch", "list", "--page-size", "2", "--all"]);
        assert_exit(&all, 0, "--all");
        assert_eq!(ids(&all, "batch_id"), newest_first);
        assert!(!all.stderr.contains("more remain"), "{}", all.stderr);
        let line = &all.json_lines()[0];
        assert_eq!((line["state"].as_str(), line["records"].as_u64()), (Some("RUNNING"), Some(3)), "{line}");
        let bad_token = as_org(&server, &org, &["batch", "list", "--page-token", "nonsense"]);
        assert_exit(&bad_token, 65, "a made-up page token");

        // a table of the same batches: a header, a row each, times to the second
        let table = as_org(&server, &org, &["--output", "table", "batch", "list", "--all", "--page-size", "2"]);
        assert_exit(&table, 0, "batch list --output table");
        let lines: Vec<&str> = table.stdout.lines().collect();
        assert_eq!(lines.len(), 6, "{}", table.stdout);
        assert!(
            lines[0].starts_with("BATCH") && lines[0].contains("STATE") && lines[0].contains("CREATED"),
            "{}",
            lines[0]
        );
        for (line, id) in lines[1..].iter().zip(&newest_first) {
            assert!(line.starts_with(id.as_str()) && line.contains("RUNNING"), "{line}");
            assert!(has_human_time(line), "no time like 2026-12-07 12:00:03Z in {line:?}");
        }
        let json_time = line["create_time"].as_str().unwrap();
        assert!(json_time.contains('T') && json_time.ends_with('Z'), "{json_time}");

        // three exports of the org (each asynchronous: 3 records, 1 at once), one of the other's
        let mut intake = server.intake().await;
        for who in [&org, &org, &org, &other] {
            let request = pb::UpsertRequest {
                object: "account".into(),
                records: (0..3).map(|i| record(json!({"code": format!("x{i}"), "name": "n"}))).collect(),
            };
            intake.upsert(authed(request, &who.key)).await.unwrap();
        }
        let mut exports = Vec::new();
        for who in [&org, &org, &org, &other] {
            // a millisecond apart at least, so that creation times order them
            tokio::time::sleep(Duration::from_millis(5)).await;
            let request = pb::ExportRequest { object: "account".into(), sync_rows: 1, ..Default::default() };
            let export = intake.export(authed(request, &who.key)).await.unwrap().into_inner();
            assert!(!export.complete, "an asynchronous export");
            if who.id == org.id {
                exports.push(export.export_id);
            }
        }
        let listed = as_org(&server, &org, &["export", "list", "--page-size", "2", "--all"]);
        assert_exit(&listed, 0, "export list");
        assert_eq!(ids(&listed, "export_id"), exports.iter().rev().cloned().collect::<Vec<_>>());
        assert!(!listed.stdout.contains("xt_"), "no token is listed: {}", listed.stdout);
        let first = as_org(&server, &org, &["export", "list", "--page-size", "2"]);
        assert_eq!(first.json_lines().len(), 2);
        assert!(first.stderr.contains("more remain: --page-token"), "{}", first.stderr);
        let table = as_org(&server, &org, &["export", "list", "-o", "table"]);
        assert!(table.stdout.starts_with("EXPORT") && table.stdout.lines().count() == 4, "{}", table.stdout);
        assert!(table.stdout.lines().skip(1).all(has_human_time), "{}", table.stdout);

        // keys: three more for the org (one revoked), oldest first, never the secrets
        let mut keys = vec![org.key_id.clone()];
        let mut secrets = vec![org.key.clone()];
        for label in ["ci", "ops", "old"] {
            let run = as_admin(&server, &["admin", "key", "create", "--org", &org.id, "--label", label]);
            assert_exit(&run, 0, "key create");
            secrets.push(run.stdout.trim().to_owned());
            let id = run.stderr.split("key id: ").nth(1).and_then(|t| t.split_whitespace().next()).unwrap();
            keys.push(id.to_owned());
        }
        assert_exit(&as_admin(&server, &["admin", "key", "revoke", &keys[3]]), 0, "key revoke");
        let listed = as_admin(&server, &["admin", "key", "list", "--org", &org.id, "--page-size", "3", "--all"]);
        assert_exit(&listed, 0, "key list");
        assert_eq!(ids(&listed, "key_id"), keys);
        for secret in &secrets {
            assert!(!listed.stdout.contains(secret.as_str()), "a secret is listed: {}", listed.stdout);
        }
        let lines = listed.json_lines();
        assert!(lines.iter().all(|l| l["org_id"] == org.id.as_str()), "{}", listed.stdout);
        assert_eq!(lines[3]["label"], "old");
        assert!(lines[3]["revoke_time"].is_string() && lines[2]["revoke_time"].is_null(), "{}", listed.stdout);
        let every = as_admin(&server, &["admin", "key", "list", "--all", "--page-size", "1"]);
        let every = ids(&every, "key_id");
        assert_eq!(every.len(), 5, "both orgs' keys: {every:?}");
        assert!(every.contains(&other.key_id));
        let first = as_admin(&server, &["admin", "key", "list", "--org", &org.id, "--page-size", "3"]);
        assert_eq!(first.json_lines().len(), 3);
        let unknown = as_admin(&server, &["admin", "key", "list", "--org", "org_nobody"]);
        assert_exit(&unknown, 66, "the keys of an unknown org");

        // a table through the environment: the keys, and a record
        let endpoint = format!("http://{}", server.addr);
        let env =
            [("BATON_ENDPOINT", endpoint.as_str()), ("BATON_ADMIN_TOKEN", ADMIN_TOKEN), ("BATON_OUTPUT", "table")];
        let table = baton(&["admin", "key", "list", "--org", &org.id], &env);
        let lines: Vec<&str> = table.stdout.lines().collect();
        assert!(lines[0].starts_with("KEY") && lines[0].contains("REVOKED"), "{}", table.stdout);
        assert_eq!(lines.len(), 5, "{}", table.stdout);
        assert!(lines[4].contains("old") && lines[4].matches('Z').count() == 2, "created and revoked: {}", lines[4]);
        let record = as_org(&server, &org, &["get", "account", "x1", "-o", "table"]);
        let lines: Vec<&str> = record.stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{}", record.stdout);
        assert!(
            lines[0].starts_with("ID") && lines[0].contains("UPDATED") && lines[0].contains("FIELDS"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with("x1") && has_human_time(lines[1]) && lines[1].contains(r#""name":"n""#),
            "{}",
            lines[1]
        );
    }
}

/// Whether `line` holds a time like `2026-12-07 12:00:03Z` (and no RFC 3339 `T`).
fn has_human_time(line: &str) -> bool {
    let bytes = line.as_bytes();
    (0..bytes.len().saturating_sub(19)).any(|i| {
        let t = &bytes[i..i + 20];
        let digits = |r: std::ops::Range<usize>| t[r].iter().all(u8::is_ascii_digit);
        digits(0..4)
            && t[4] == b'-'
            && digits(5..7)
            && t[7] == b'-'
            && digits(8..10)
            && t[10] == b' '
            && digits(11..13)
            && t[13] == b':'
            && digits(14..16)
            && t[16] == b':'
            && digits(17..19)
            && t[19] == b'Z'
    })
}

/// `baton completions SHELL` prints a script for bash, zsh and fish that knows the commands.
#[test]
fn completions_for_each_shell() {
    for (shell, mark) in [("bash", "complete -F"), ("zsh", "#compdef baton"), ("fish", "complete -c baton")] {
        let run = baton(&["completions", shell], &[]);
        assert_exit(&run, 0, shell);
        assert!(run.stdout.contains(mark), "{shell}: no {mark:?} in\n{}", run.stdout);
        for word in ["batch", "export", "completions", "output"] {
            assert!(run.stdout.contains(word), "{shell}: no {word:?}");
        }
    }
    assert_exit(&baton(&["completions", "tcsh"], &[]), 64, "an unknown shell");
}
