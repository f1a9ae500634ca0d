//! The clinician's screen, served by `sgps run` itself: a small HTTP server (tiny_http, one
//! thread per connection) in front of the device loop. Every request that changes something
//! becomes a [`Command`] on the device's input channel, the same channel the buttons feed, and
//! every change is pushed to all open screens as a server-sent event — so a tap and a button
//! press do the same thing and each screen sees the other's effect at once. Assets are compiled
//! into the binary (`assets/`); nothing is loaded from elsewhere.
//!
//! Loopback only by default. A profile that listens on another interface must set a pairing
//! token, which remote browsers present once (`/pair?token=…` sets a cookie) or as a bearer
//! token; requests from the board itself (the kiosk) need none.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::json;
use tiny_http::{Header, Method, Request, Response};

use crate::board::UiConfig;
use crate::device::{Command, Input, Snapshot};
use crate::report;

mod routes;
use routes::query;
pub use routes::{Refusal, Route, parse_request};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Largest request body accepted (bytes); descriptions are at most 1000.
pub const MAX_BODY: usize = 16 * 1024;
/// Longest request target accepted.
pub const MAX_URL: usize = 2048;
/// Connections served at once; more get 503.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a request waits for the device (a synthesis on a slow board takes seconds).
const DEVICE_TIMEOUT: Duration = Duration::from_secs(120);
/// Rows the history screen gets at most.
const HISTORY_ROWS: usize = 500;

/// The latest state, shared with the event streams.
#[derive(Default)]
pub struct Hub {
    latest: Mutex<(u64, String)>,
    changed: Condvar,
}

impl Hub {
    /// Record a new state and wake the event streams.
    pub fn publish(&self, snap: &Snapshot) {
        let json = serde_json::to_string(snap).expect("a snapshot serializes");
        let mut l = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        if l.1 != json {
            l.0 += 1;
            l.1 = json;
            self.changed.notify_all();
        }
    }

    fn latest(&self) -> (u64, String) {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Wait until a state newer than `seen` is published (or `timeout` passes).
    fn wait_newer(&self, seen: u64, timeout: Duration) -> Option<(u64, String)> {
        let l = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let (l, _) = self
            .changed
            .wait_timeout_while(l, timeout, |l| l.0 <= seen)
            .unwrap_or_else(|p| p.into_inner());
        (l.0 > seen).then(|| l.clone())
    }
}

/// Facts for the Device screen that do not change while running.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub board: String,
    pub sgps_version: &'static str,
    pub models_dir: String,
    pub image_encoder: String,
    pub image_encoder_sha256: String,
    pub text_encoder: String,
    pub synthesizer_sha256: String,
    pub storage_dir: String,
}

/// What the server needs.
pub struct Context {
    pub inputs: mpsc::Sender<Input>,
    pub hub: Arc<Hub>,
    pub storage_dir: PathBuf,
    pub export_dir: PathBuf,
    pub pairing_token: Option<String>,
    pub info: DeviceInfo,
    /// The audit log's closed segments, parsed once (the history view reads the log per request).
    pub audit_cache: std::sync::Mutex<crate::store::audit::SegmentCache>,
    /// The log's thumbnail records, refreshed when a capture is not in it yet.
    pub thumbnails: std::sync::Mutex<crate::store::ThumbnailIndex>,
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
}

/// Bind and serve on a background thread.
pub fn serve(cfg: &UiConfig, ctx: Context) -> Result<Server, String> {
    let addr = cfg.validate()?;
    let server = tiny_http::Server::http(addr)
        .map_err(|e| format!("cannot listen on {addr}: {e} (is another sgps running?)"))?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or("the screen's listener has no IP address")?;
    let ctx = Arc::new(ctx);
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("ui".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    let _ = req.respond(error(503, "too many open connections; try again"));
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (ctx, active) = (ctx.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name("ui-conn".into())
                    .spawn(move || {
                        handle(req, &ctx);
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    log::error!("screen: cannot start a connection thread: {e}");
                }
            }
        })
        .map_err(|e| format!("cannot start the screen's thread: {e}"))?;
    Ok(Server { addr })
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header")
}

type Resp = Response<std::io::Cursor<Vec<u8>>>;

fn with_common(r: Resp) -> Resp {
    r.with_header(header("Cache-Control", "no-store"))
        .with_header(header("X-Content-Type-Options", "nosniff"))
        .with_header(header("X-Frame-Options", "DENY"))
        .with_header(header(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'",
        ))
}

fn error(status: u16, msg: &str) -> Resp {
    json_resp(status, &json!({ "error": msg }))
}

fn json_resp(status: u16, v: &serde_json::Value) -> Resp {
    with_common(
        Response::from_data(serde_json::to_vec(v).expect("json"))
            .with_status_code(status)
            .with_header(header("Content-Type", "application/json")),
    )
}

fn asset(body: &'static str, ctype: &str) -> Resp {
    with_common(
        Response::from_data(body.as_bytes().to_vec()).with_header(header("Content-Type", ctype)),
    )
}

fn header_value<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// Constant-time comparison of a presented token.
fn token_matches(given: &str, want: &str) -> bool {
    given.len() == want.len()
        && given
            .bytes()
            .zip(want.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Loopback peers (the kiosk) are trusted; others must present the pairing token.
fn authorized(req: &Request, token: Option<&str>) -> bool {
    if req.remote_addr().is_some_and(|a| a.ip().is_loopback()) {
        return true;
    }
    let Some(want) = token else {
        return false;
    };
    let bearer = header_value(req, "Authorization").and_then(|v| v.strip_prefix("Bearer "));
    let cookie = header_value(req, "Cookie").and_then(|c| {
        c.split(';')
            .find_map(|kv| kv.trim().strip_prefix("sgps_token="))
    });
    bearer.or(cookie).is_some_and(|g| token_matches(g, want))
}

/// Read a request body of at most [`MAX_BODY`] bytes.
fn read_body(req: &mut Request) -> Result<Vec<u8>, Refusal> {
    let too_big = || {
        Refusal::new(
            413,
            format!("request body over {MAX_BODY} bytes; a description is at most 1000"),
        )
    };
    if req.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(too_big());
    }
    let mut buf = Vec::new();
    req.as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Refusal::new(400, format!("reading the request body: {e}")))?;
    if buf.len() > MAX_BODY {
        return Err(too_big());
    }
    Ok(buf)
}

/// Send a command to the device and wait for the state after it.
fn device(ctx: &Context, cmd: Command) -> Resp {
    let (tx, rx) = mpsc::channel();
    if ctx.inputs.send(Input::Request(cmd, tx)).is_err() {
        return error(503, "the device loop has stopped; restart sgps");
    }
    match rx.recv_timeout(DEVICE_TIMEOUT) {
        Ok(Ok(snap)) => json_resp(200, &serde_json::to_value(snap).expect("json")),
        Ok(Err(msg)) => error(409, &msg),
        Err(_) => error(504, "the device did not answer in time; look at the device"),
    }
}

fn handle(mut req: Request, ctx: &Context) {
    let method = req.method().clone();
    let url = req.url().to_owned();
    let path = url.split('?').next().unwrap_or("").to_owned();
    log::debug!("screen: {method} {path}");
    if method == Method::Get && path == "/pair" {
        let q = query(&url);
        let given = q
            .iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.as_str());
        let ok = match (&ctx.pairing_token, given) {
            (Some(want), Some(g)) => token_matches(g, want),
            _ => false,
        };
        let r = if ok {
            with_common(
                Response::from_string("paired")
                    .with_status_code(303)
                    .with_header(header("Location", "/"))
                    .with_header(header(
                        "Set-Cookie",
                        &format!(
                            "sgps_token={}; HttpOnly; SameSite=Strict; Path=/",
                            ctx.pairing_token.as_deref().unwrap_or("")
                        ),
                    )),
            )
        } else {
            error(
                403,
                "wrong or missing pairing token; the token is in the board profile ([ui] pairing_token)",
            )
        };
        let _ = req.respond(r);
        return;
    }
    if !authorized(&req, ctx.pairing_token.as_deref()) {
        let _ = req.respond(error(
            401,
            "this screen is paired: open /pair?token=<the board's pairing token> first",
        ));
        return;
    }
    if method == Method::Post {
        // a page from another origin must not drive the device (the kiosk's own page sends
        // its origin, or none)
        let host = header_value(&req, "Host").unwrap_or("");
        if let Some(origin) = header_value(&req, "Origin")
            && origin != format!("http://{host}")
        {
            let _ = req.respond(error(403, "cross-origin request refused"));
            return;
        }
    }
    let body = if method == Method::Post {
        match read_body(&mut req) {
            Ok(b) => b,
            Err(r) => {
                let _ = req.respond(error(r.status, &r.message));
                return;
            }
        }
    } else {
        Vec::new()
    };
    let ctype = header_value(&req, "Content-Type").map(str::to_owned);
    match parse_request(method.as_str(), &url, ctype.as_deref(), &body) {
        Ok(Route::Events) => events(req, ctx),
        Ok(route) => {
            let _ = req.respond(execute(route, ctx));
        }
        Err(r) => {
            let _ = req.respond(error(r.status, &r.message));
        }
    }
}

/// Act on an understood request.
fn execute(route: Route, ctx: &Context) -> Resp {
    match route {
        Route::Index => asset(INDEX_HTML, "text/html; charset=utf-8"),
        Route::Script => asset(APP_JS, "text/javascript; charset=utf-8"),
        Route::Style => asset(APP_CSS, "text/css; charset=utf-8"),
        Route::State => {
            let (_, s) = ctx.hub.latest();
            if s.is_empty() {
                return error(503, "the device is starting; try again in a moment");
            }
            with_common(
                Response::from_data(s.into_bytes())
                    .with_header(header("Content-Type", "application/json")),
            )
        }
        Route::Events => error(500, "event streams are served separately"),
        Route::DeviceInfo => device_info(ctx),
        Route::History(f) => history(&f, ctx),
        Route::Thumbnail(sha) => {
            use crate::store::StoredThumbnail;
            let recorded = match recorded_thumbnail(ctx, &sha) {
                Ok(r) => r,
                Err(e) => return error(500, &format!("reading the audit log: {e}")),
            };
            match crate::store::read_thumbnail(&ctx.storage_dir, &sha, recorded) {
                StoredThumbnail::Intact(b) => with_common(
                    Response::from_data(b).with_header(header("Content-Type", "image/jpeg")),
                ),
                StoredThumbnail::Missing => error(404, "no thumbnail kept for this capture"),
                StoredThumbnail::Damaged(why) => error(
                    500,
                    &format!(
                        "the thumbnail of this capture is damaged on the storage card ({why}), so it is not shown; the decision and its audit record are unaffected"
                    ),
                ),
                StoredThumbnail::Altered(why) => error(
                    409,
                    &format!(
                        "the thumbnail of this capture is not the one the device stored ({why}), so it is not shown; the decision and its audit record are unaffected. Run sgps audit verify on the storage directory"
                    ),
                ),
            }
        }
        Route::Command(c) => device(ctx, c),
        Route::Export(scope) => export(ctx, scope),
    }
}

fn device_info(ctx: &Context) -> Resp {
    let mut v = serde_json::to_value(&ctx.info).expect("json");
    let now = crate::store::audit::now_unix_ms();
    v["time_utc"] = json!(report::time(now));
    v["time_unix_ms"] = json!(now);
    if let Some((free, total)) = free_space(&ctx.storage_dir) {
        v["storage_free_bytes"] = json!(free);
        v["storage_total_bytes"] = json!(total);
    }
    v["export_dir"] = json!(ctx.export_dir.display().to_string());
    v["export_dir_present"] = json!(ctx.export_dir.is_dir());
    json_resp(200, &v)
}

/// Free and total bytes of the filesystem holding `dir`.
#[cfg(target_os = "linux")]
pub fn free_space(dir: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let f = st.f_frsize as u64;
    Some((st.f_bavail as u64 * f, st.f_blocks as u64 * f))
}

#[cfg(not(target_os = "linux"))]
pub fn free_space(_dir: &std::path::Path) -> Option<(u64, u64)> {
    None
}

/// What the audit log recorded of a capture's thumbnail, from the index, which is rebuilt from
/// the log (scanning only what changed) when it has no hash for the capture yet: the device
/// appends the thumbnail's record after the capture's.
fn recorded_thumbnail(
    ctx: &Context,
    sha: &[u8; 32],
) -> Result<crate::store::Recorded, crate::store::StoreError> {
    use crate::store::{Recorded, ThumbnailIndex};
    let mut ix = ctx
        .thumbnails
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let r = ix.recorded(sha);
    if matches!(r, Recorded::Hash(_)) || (ix.knows(sha) && r == Recorded::Unchecked) {
        return Ok(r);
    }
    let (records, _) = {
        let mut cache = ctx
            .audit_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        crate::store::audit::read_all_cached(&ctx.storage_dir, &mut cache)?
    };
    *ix = ThumbnailIndex::from_records(&records);
    Ok(ix.recorded(sha))
}

fn history(filter: &report::Filter, ctx: &Context) -> Resp {
    let read = {
        // a panic elsewhere while holding the lock leaves a cache that is still consistent
        let mut cache = ctx
            .audit_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        report::read_rows_cached(&ctx.storage_dir, &mut cache)
    };
    let (rows, head) = match read {
        Ok(r) => r,
        Err(e) => return error(500, &format!("reading the audit log: {e}")),
    };
    let kept: Vec<&report::Row> = rows.iter().rev().filter(|r| filter.keep(r)).collect();
    let total = kept.len();
    let days: std::collections::BTreeSet<String> =
        rows.iter().map(|r| report::day(r.time_unix_ms)).collect();
    json_resp(
        200,
        &json!({
            "rows": kept.into_iter().take(HISTORY_ROWS).collect::<Vec<_>>(),
            "total": total,
            "days": days.into_iter().rev().collect::<Vec<_>>(),
            "audit_head": head.map(hex::encode),
        }),
    )
}

fn export(ctx: &Context, scope: report::Scope) -> Resp {
    match report::write(
        &ctx.storage_dir,
        &ctx.export_dir,
        scope,
        &ctx.info.board,
        crate::store::audit::now_unix_ms(),
    ) {
        Ok(w) => json_resp(200, &serde_json::to_value(w).expect("json")),
        Err(e) => error(409, &e),
    }
}

/// Server-sent events: the state now, then after every change (a comment every 15 s keeps
/// the connection alive and notices a closed screen).
fn events(req: Request, ctx: &Context) {
    let mut w = req.into_writer();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\nX-Content-Type-Options: nosniff\r\n\r\n";
    if w.write_all(head.as_bytes()).is_err() {
        return;
    }
    let (mut seen, first) = ctx.hub.latest();
    if w.write_all(format!("data: {first}\n\n").as_bytes())
        .is_err()
        || w.flush().is_err()
    {
        return;
    }
    loop {
        let msg = match ctx.hub.wait_newer(seen, Duration::from_secs(15)) {
            Some((n, s)) => {
                seen = n;
                format!("data: {s}\n\n")
            }
            None => ": keep-alive\n\n".to_string(),
        };
        if w.write_all(msg.as_bytes()).is_err() || w.flush().is_err() {
            return;
        }
    }
}
