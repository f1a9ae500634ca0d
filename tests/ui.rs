//! The clinician's screen in a real browser: headless Chromium driven through chromedriver
//! (WebDriver, from the OS packages `chromium` and `chromium-driver`) against `sgps run` on the sim
//! board. Enrolls the four classes through the page (one capture rejected by the quality gate),
//! screens captures, and checks that the class, the probability bars and the verdict on the page
//! equal the audit log and the plain pipeline for the same images. Bad requests get clear errors
//! and change nothing. Screenshots for a person: `target/ui-screenshots/*.png`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use sgps::board::TaskFile;
use sgps::pipeline::{LoadOptions, Pipeline, SynthMode};
use sgps::quality::{self, GateThresholds};
use sgps::store::{self, AuditEvent};
use sgps::synthesizer::ClassSupport;

const K: usize = 5;
const QUERIES_PER_CLASS: usize = 2;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Kills the child when the test ends, however it ends.
struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal W3C WebDriver client (the protocol is plain HTTP + JSON).
struct Driver {
    agent: ureq::Agent,
    base: String,
}

impl Driver {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (ok, v) = self.call_status(method, path, body);
        assert!(ok, "webdriver {method} {path}: {v}");
        v
    }

    /// (success, value) of a WebDriver call.
    fn call_status(&self, method: &str, path: &str, body: Option<Value>) -> (bool, Value) {
        let url = format!("{}{path}", self.base);
        let mut resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, b) => self.agent.post(&url).send_json(b.unwrap_or(json!({}))),
        }
        .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let status = resp.status();
        let v: Value = resp.body_mut().read_json().unwrap();
        (status.is_success(), v["value"].clone())
    }

    fn start(port: u16) -> (Driver, String) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let mut d = Driver {
            agent,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut args = vec![
            "--headless=new",
            "--disable-gpu",
            "--window-size=1280,1000",
            "--disable-dev-shm-usage",
            "--no-first-run",
        ];
        // root (CI containers) cannot use Chromium's sandbox
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            args.push("--no-sandbox");
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": args, "binary": which("chromium").unwrap()}
        }}});
        let v = d.call("POST", "/session", Some(caps));
        let id = v["sessionId"].as_str().unwrap().to_string();
        d.base = format!("{}/session/{id}", d.base);
        (d, id)
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let id = self.find(css);
        let v = self.call_status("POST", &format!("/element/{id}/click"), None);
        assert!(v.0, "clicking {css}: {}", v.1);
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/clear"), None);
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Wait until `script` returns a truthy value; returns it.
    fn wait_for(&self, script: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v = self.js(script);
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, path: &Path) {
        let v = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// A raw HTTP request (for malformed ones a browser would not send).
fn raw(addr: &str, req: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn post(addr: &str, path: &str, body: &str) -> (u16, String) {
    raw(
        addr,
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

/// Sample images of `class` that pass the default gate: K for support, then queries.
fn pick(class: &str) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let gate = GateThresholds::default();
    let dir = repo().join("tests/samples/isic").join(class);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    files.sort();
    let ok: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| quality::check(&sgps::image_io::load_rgb(p).unwrap(), &gate).is_ok())
        .take(K + QUERIES_PER_CLASS)
        .collect();
    assert_eq!(
        ok.len(),
        K + QUERIES_PER_CLASS,
        "{class}: too few samples pass the gate"
    );
    (ok[..K].to_vec(), ok[K..].to_vec())
}

/// `sgps run --ui 127.0.0.1:0` on the board; returns the process and the screen's URL.
fn start_sgps(board: &Path, storage: &Path, frames: &Path) -> (Reap, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sgps"))
        .args(["run", "--ui", "127.0.0.1:0", "--board"])
        .arg(board)
        .arg("--storage-dir")
        .arg(storage)
        .arg("--replay-dir")
        .arg(frames)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let reap = Reap(child);
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("UI ")
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_owned)
        })
        .expect("sgps run prints the screen's address");
    // keep draining stdout so the device never blocks on a full pipe
    std::thread::spawn(move || lines.for_each(drop));
    (reap, url)
}

fn get_state(addr: &str) -> Value {
    let t = raw(
        addr,
        format!("GET /api/state HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .1;
    serde_json::from_str(t.split("\r\n\r\n").nth(1).unwrap_or("null")).unwrap()
}

#[test]
fn screen_in_a_real_browser_matches_audit_log_and_plain_pipeline() {
    let chromium = which("chromium");
    let driver = which("chromedriver");
    if !common::require(
        common::models_dir().join("manifest.json").is_file(),
        "ui test",
        "models/manifest.json not found (regenerate the models with `cargo xtask train`)",
    ) || !common::require(
        chromium.is_some() && driver.is_some(),
        "ui test",
        "chromium and chromedriver are not on PATH (apt install chromium chromium-driver; .ci/run does)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let task = TaskFile::load(&repo().join("board/tasks/isic-novel.toml")).unwrap();
    let picks: Vec<_> = task.classes.iter().map(|c| pick(&c.name)).collect();

    // replay frames: class 0's shots, a dark frame (rejected), the other shots, the queries
    // replay directory: enrollment frames (class order), one dark frame (rejected), queries
    let (frames, queries) = common::session_frames(tmp.path(), &picks);
    let storage = tmp.path().join("store");
    let usb = tmp.path().join("usb");
    std::fs::create_dir(&usb).unwrap();
    let board_text = std::fs::read_to_string(repo().join("board/sim.toml"))
        .unwrap()
        .replace(
            "models_dir = \"../models\"",
            &format!("models_dir = {:?}", common::models_dir()),
        )
        .replace(
            "task_file = \"tasks/isic-novel.toml\"",
            &format!(
                "task_file = {:?}",
                repo().join("board/tasks/isic-novel.toml")
            ),
        )
        .replace("looping = true", "looping = false")
        .replace(
            "export_dir = \"../target/sim-usb\"",
            &format!("export_dir = {usb:?}"),
        );
    assert!(
        board_text.contains(&format!("{usb:?}")),
        "sim.toml layout changed"
    );
    let board = tmp.path().join("board.toml");
    std::fs::write(&board, board_text).unwrap();

    // the device program, serving its screen on a free port
    let (sgps_proc, url) = start_sgps(&board, &storage, &frames);
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    assert!(
        addr.starts_with("127.0.0.1:"),
        "loopback by default: {addr}"
    );

    // malformed and hostile requests: clear errors, nothing changed
    let state_before = get_state(&addr);
    let big = "x".repeat(100 * 1024);
    let (s, t) = post(
        &addr,
        "/api/class/update",
        &format!("{{\"class\":0,\"description\":\"{big}\"}}"),
    );
    assert_eq!(s, 413, "{t}");
    let (s, t) = post(
        &addr,
        "/api/class/update",
        &format!("{{\"class\":0,\"description\":\"{}\"}}", "y".repeat(5000)),
    );
    assert!(s == 409 && t.contains("at most 1000"), "{t}");
    let (s, t) = post(&addr, "/api/class", "{\"name\": \"a/../../b\"}");
    assert!(s == 409 && t.contains("path separator"), "{t}");
    let (s, t) = post(&addr, "/api/class/update", "{\"class\": 0, \"name\": ");
    assert!(s == 400 && t.contains("malformed request"), "{t}");
    let (s, t) = post(&addr, "/api/enroll", "{\"class\": 99}");
    assert!(s == 409 && t.contains("there is no class 99"), "{t}");
    let (s, _) = post(&addr, "/api/button", "{\"button\": \"self-destruct\"}");
    assert_eq!(s, 400);
    let (s, t) = raw(
        &addr,
        format!("GET /etc/passwd HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert!(s == 404 && !t.contains("root:"), "{t}");
    let (s, _) = raw(
        &addr,
        format!("GET /api/thumb/..%2F..%2Faudit.log HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert_eq!(s, 400);
    let (s, _) = raw(
        &addr,
        format!("POST /api/button HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://evil.example\r\nContent-Type: application/json\r\nContent-Length: 20\r\nConnection: close\r\n\r\n{{\"button\":\"capture\"}}").as_bytes(),
    );
    assert_eq!(s, 403, "cross-origin requests are refused");
    let (s, _) = raw(&addr, b"GARBAGE\r\n\r\n");
    assert_ne!(s, 200);
    assert_eq!(
        state_before,
        get_state(&addr),
        "bad requests changed nothing"
    );

    // the browser
    let wd_port = free_port();
    let _chromedriver = Reap(
        Command::new(driver.unwrap())
            .arg(format!("--port={wd_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (d, _) = Driver::start(wd_port);
    let shots = repo().join("target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    d.goto(&url);
    d.wait_for(
        "return document.getElementById('state').textContent.includes('waiting for enrollment')",
        "the first state",
    );

    // enroll through the page: 4 x K shots and one rejected capture
    let shots_now = "return JSON.stringify([...document.querySelectorAll('#shot-counts li')].map(l => l.textContent))";
    let total_shots = |d: &Driver| -> usize {
        let v: Vec<String> = serde_json::from_str(d.js(shots_now).as_str().unwrap()).unwrap();
        v.iter()
            .map(|t| {
                t.split(": ")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
            })
            .sum()
    };
    d.click("[data-tab=enroll]");
    for press in 0..(4 * K + 1) {
        let before = d.js("return document.getElementById('gate').textContent + '|' + document.getElementById('state').textContent");
        d.click("#enroll-capture");
        d.wait_for(
            &format!(
                "const s = document.getElementById('gate').textContent + '|' + document.getElementById('state').textContent; return s !== {before} && !document.getElementById('enroll-capture').disabled || document.getElementById('state').textContent.includes('screening')"
            ),
            "the capture's result",
        );
        if press == K {
            // the dark frame: rejected with its reason, nothing enrolled
            let gate = d.js("return document.getElementById('gate').textContent");
            assert!(
                gate.as_str()
                    .unwrap()
                    .starts_with("Rejected by the quality gate"),
                "{gate}"
            );
            assert_eq!(total_shots(&d), K);
            d.screenshot(&shots.join("enroll-rejected.png"));
        }
    }
    d.wait_for(
        "return document.getElementById('state').textContent.includes('screening')",
        "synthesis after the last shot",
    );
    assert_eq!(total_shots(&d), 4 * K);
    d.click("[data-tab=task]");
    d.screenshot(&shots.join("task.png"));

    // screen the queries through the page
    d.click("[data-tab=screen]");
    let mut shown = Vec::new();
    for i in 0..queries.len() {
        d.click("#screen-capture");
        let v = d.wait_for(
            &format!(
                "const t = document.getElementById('top-class'); if (t.dataset.seq === undefined || document.querySelectorAll('#bars .bar').length === 0) return null; \
                 const img = document.getElementById('screen-img'); \
                 const r = {{seq: Number(t.dataset.seq), label: t.textContent, verdict: document.getElementById('verdict').dataset.verdict, \
                 bars: [...document.querySelectorAll('#bars .bar')].map(b => [b.dataset.class, Number(b.dataset.p)]), \
                 img: img.getAttribute('src'), shown: img.complete && img.naturalWidth > 0}}; \
                 return (r.seq > {prev} && r.shown ? JSON.stringify(r) : null);",
                prev = shown
                    .last()
                    .map(|v: &Value| v["seq"].as_u64().unwrap())
                    .unwrap_or(0)
            ),
            "a decision on the page, with its capture shown",
        );
        let v: Value = serde_json::from_str(v.as_str().unwrap()).unwrap();
        if i == 0 {
            d.screenshot(&shots.join("screen-decision.png"));
        }
        shown.push(v);
    }
    d.click("[data-tab=history]");
    d.wait_for(
        "return document.querySelectorAll('#history-table tbody tr').length > 0",
        "history rows",
    );
    d.screenshot(&shots.join("history.png"));
    // export to the "stick"
    d.click("[data-tab=export]");
    d.click("#export button[data-scope=session]");
    let written = d.wait_for(
        "return document.getElementById('export-result').textContent",
        "the export",
    );
    assert!(
        written.as_str().unwrap().starts_with("Written: "),
        "{written}"
    );

    // the page equals the audit log ...
    let (records, rep) = store::audit::read_all(&storage, |_, _| {}).unwrap();
    assert!(rep.is_intact());
    let decisions: Vec<_> = records
        .iter()
        .filter_map(|r| match &r.event {
            AuditEvent::Decision {
                capture_sha256,
                probabilities,
                label,
                verdict,
                classifier_id,
                ..
            } => Some((
                r.seq,
                *capture_sha256,
                probabilities,
                label,
                *verdict,
                classifier_id,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(decisions.len(), queries.len());
    for (page, log) in shown.iter().zip(&decisions) {
        assert_eq!(page["seq"].as_u64().unwrap(), log.0);
        assert_eq!(page["label"].as_str().unwrap(), log.3);
        assert_eq!(page["verdict"].as_str().unwrap(), log.4.as_str());
        // the capture shown is this decision's (its thumbnail, named by the capture's SHA-256)
        assert_eq!(
            page["img"].as_str().unwrap(),
            format!("/api/thumb/{}.jpg", hex::encode(log.1))
        );
        let bars = page["bars"].as_array().unwrap();
        assert_eq!(bars.len(), task.classes.len());
        for ((bar, p), c) in bars.iter().zip(log.2.iter()).zip(&task.classes) {
            assert_eq!(bar[0].as_str().unwrap(), c.name);
            assert!(
                (bar[1].as_f64().unwrap() - *p as f64).abs() < 2e-6,
                "{bar} vs {p}"
            );
        }
    }

    // the capture's thumbnail is served checked: as stored, it is a JPEG; damaged on the card,
    // it is refused with the reason instead of being shown as the capture
    let thumb = |addr: &str| {
        let req = format!(
            "GET /api/thumb/{}.jpg HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
            hex::encode(decisions[0].1)
        );
        raw(addr, req.as_bytes())
    };
    let (s, t) = thumb(&addr);
    assert!(
        s == 200 && t.contains("image/jpeg"),
        "{}",
        &t[..t.len().min(300)]
    );
    let thumb_file = store::thumbnail_path(&storage, &decisions[0].1);
    let stored = std::fs::read(&thumb_file).unwrap();
    let mut damaged = stored.clone();
    damaged[stored.len() / 2] ^= 0x40;
    std::fs::write(&thumb_file, &damaged).unwrap();
    let (s, t) = thumb(&addr);
    assert!(s == 500 && t.contains("damaged on the storage card"), "{t}");
    // another capture's thumbnail, intact, in its place: not the one the audit log recorded
    let other = std::fs::read(store::thumbnail_path(&storage, &decisions[1].1)).unwrap();
    assert_ne!(other, stored);
    std::fs::write(&thumb_file, &other).unwrap();
    let (s, t) = thumb(&addr);
    assert!(
        s == 409 && t.contains("not the one the device stored"),
        "{t}"
    );
    std::fs::write(&thumb_file, &stored).unwrap();

    // ... and the plain pipeline on the same files
    let pipeline = Pipeline::load(&common::models_dir(), &LoadOptions::default()).unwrap();
    let mut support: Vec<ClassSupport> = task
        .classes
        .iter()
        .zip(&picks)
        .map(|(c, (s, _))| ClassSupport {
            name: c.name.clone(),
            description: c.description.clone(),
            text_embedding: None,
            shots: s
                .iter()
                .map(|p| pipeline.embed_image_file(p).unwrap())
                .collect(),
        })
        .collect();
    pipeline.embed_descriptions(&mut support).unwrap();
    let clf = pipeline
        .synthesize(&support, SynthMode::ImagesAndText)
        .unwrap();
    for (q, log) in queries.iter().zip(&decisions) {
        assert_eq!(
            log.5, &clf.id,
            "the device's classifier is the plain pipeline's"
        );
        let img = sgps::image_io::load_rgb(q).unwrap();
        assert_eq!(log.1, store::capture_sha256(&img));
        let pred = clf.predict(&pipeline.embed_image_file(q).unwrap());
        assert_eq!(&pred.probabilities, log.2, "{}", q.display());
        assert_eq!(&pred.top_label, log.3);
        assert_eq!(sgps::device::verdict(&pred, &task), log.4);
    }

    // the report on the stick lists every capture's SHA-256
    let csv = std::fs::read_dir(&usb)
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "csv"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .expect("a CSV report on the stick");
    for (_, sha, ..) in &decisions {
        assert!(csv.contains(&hex::encode(sha)));
    }
    let html = std::fs::read_dir(&usb)
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "html"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .unwrap();
    assert!(html.contains("data:image/jpeg;base64,") && !html.contains("src=\"http"));

    // a class renamed on the Task screen (typed as on a USB keyboard): the task and the
    // classifier follow, and it survives a restart
    d.click("[data-tab=task]");
    // clear the field as with a USB keyboard, then type on the on-screen keyboard
    d.type_into("form[data-class=vascular_lesion] input[name=name]", "");
    d.click("form[data-class=vascular_lesion] input[name=name]");
    d.click("#kbd-toggle");
    for c in "vascular lesion (angioma)".chars() {
        let key = if c == ' ' {
            "space".to_string()
        } else {
            c.to_string()
        };
        d.click(&format!("#kbd button[data-key=\"{key}\"]"));
    }
    assert_eq!(
        d.js("return document.querySelector('form[data-class=vascular_lesion] input[name=name]').value"),
        json!("vascular lesion (angioma)")
    );
    d.screenshot(&shots.join("task-keyboard.png"));
    d.click("#kbd button[data-key=done]");
    d.click("form[data-class=vascular_lesion] button[type=submit]");
    d.wait_for(
        "return document.querySelector('form[data-class=\"vascular lesion (angioma)\"]') !== null",
        "the renamed class on the page",
    );
    let t = raw(
        &addr,
        format!("GET /api/state HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .1;
    let renamed: Value = serde_json::from_str(t.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(renamed["classes"][3]["name"], "vascular lesion (angioma)");
    let clf_id = renamed["classifier_id"]
        .as_str()
        .expect("re-synthesized")
        .to_string();
    assert_ne!(clf_id, clf.id);
    assert_eq!(renamed["state"], "screen");
    let _ = d.call("DELETE", "", None);
    drop(sgps_proc);
    // restart on the same storage: the edited task and its classifier are restored
    let (_sgps, url) = start_sgps(&board, &storage, &frames);
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let after = get_state(addr);
    assert_eq!(after["classes"][3]["name"], "vascular lesion (angioma)");
    assert_eq!(after["classifier_id"].as_str(), Some(clf_id.as_str()));
    assert_eq!(after["state"], "screen");
    println!(
        "screenshots: {}",
        [
            "enroll-rejected",
            "task",
            "task-keyboard",
            "screen-decision",
            "history"
        ]
        .map(|n| shots.join(format!("{n}.png")).display().to_string())
        .join(", ")
    );
}

/// A button press and a tap on the screen go through one state machine: each sees the other's
/// effect, and every screen gets the state after each of them.
#[test]
fn a_button_press_and_a_tap_share_one_device() {
    use sgps::device::{Command as Cmd, Device, Input};
    use sgps::gpio::{Button, ButtonEvent, Press};
    use std::sync::{Arc, Mutex, mpsc};

    if !common::require(
        common::models_dir().join("manifest.json").is_file(),
        "ui test",
        "models/manifest.json not found (regenerate the models with `cargo xtask train`)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let frames = tmp.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    let (shots, _) = pick("dermatofibroma");
    for (i, p) in shots.iter().enumerate() {
        std::os::unix::fs::symlink(p, frames.join(format!("{i:03}.jpg"))).unwrap();
    }
    let mut profile = sgps::board::BoardProfile::load(&repo().join("board/sim.toml")).unwrap();
    profile.storage_dir = tmp.path().join("store");
    let task = TaskFile::load(&repo().join("board/tasks/isic-novel.toml")).unwrap();
    let camera = sgps::camera::ReplayCamera::open(&frames, false, Duration::from_secs(2)).unwrap();
    let dev = Device::new(
        profile,
        task,
        common::pipeline(),
        Box::new(camera),
        Box::<sgps::gpio::sim::SimLeds>::default(),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let capture = ButtonEvent {
        button: Button::Capture,
        press: Press::Short,
    };
    let next = ButtonEvent {
        button: Button::Next,
        press: Press::Short,
    };
    let (r1, a1) = mpsc::channel();
    let (r2, a2) = mpsc::channel();
    tx.send(Input::Button(capture)).unwrap(); // the hardware button: shot 1 of class 0
    tx.send(Input::Request(Cmd::Button(capture), r1)).unwrap(); // a tap: shot 2 of class 0
    tx.send(Input::Button(next)).unwrap(); // the button: next class
    tx.send(Input::Request(Cmd::Button(capture), r2)).unwrap(); // a tap: shot 1 of class 1
    tx.send(Input::ButtonsEnded).unwrap();
    drop(tx);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let summary = dev
        .run_inputs(rx, true, &move |s| {
            s2.lock().unwrap().push((
                s.enroll_class,
                s.classes.iter().map(|c| c.shots.len()).collect::<Vec<_>>(),
            ))
        })
        .unwrap();
    assert_eq!(summary.shots_enrolled, 3);
    // the tap's answer already shows the button's shot, and the next tap the button's class change
    let tap1 = a1.recv().unwrap().unwrap();
    assert_eq!(tap1.classes[0].shots.len(), 2);
    let tap2 = a2.recv().unwrap().unwrap();
    assert_eq!(tap2.enroll_class, Some(1));
    assert_eq!(tap2.classes[1].shots.len(), 1);
    // every screen saw the state after start-up and after each of the four inputs
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (None, vec![0, 0, 0, 0]),
            (Some(0), vec![1, 0, 0, 0]),
            (Some(0), vec![2, 0, 0, 0]),
            (Some(1), vec![2, 0, 0, 0]),
            (Some(1), vec![2, 1, 0, 0]),
        ]
    );
}
