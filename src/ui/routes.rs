//! The screen's requests: what each route means, parsed without acting on it (pure, so that
//! it can be unit-tested and fuzzed).

use serde::Deserialize;

use super::{MAX_BODY, MAX_URL};
use crate::device::Command;
use crate::gpio::{Button, ButtonEvent, Press};
use crate::report;

pub(super) fn query(url: &str) -> Vec<(String, String)> {
    url.split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hexv = |c: u8| (c as char).to_digit(16);
                match (hexv(b[i + 1]), hexv(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ButtonReq {
    button: String,
    #[serde(default)]
    press: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassReq {
    class: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddReq {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    urgent: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateReq {
    class: usize,
    #[serde(default)]
    name: Option<String>,
    /// "" removes the description.
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    urgent: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShotReq {
    class: usize,
    capture_sha256: String,
    #[serde(default)]
    retake: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportReq {
    #[serde(default)]
    scope: Option<String>,
}

fn sha_from_hex(s: &str) -> Option<[u8; 32]> {
    let mut sha = [0u8; 32];
    hex::decode_to_slice(s, &mut sha).ok()?;
    Some(sha)
}

/// A request the screen understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    Index,
    Script,
    Style,
    State,
    Events,
    DeviceInfo,
    History(report::Filter),
    Thumbnail([u8; 32]),
    Command(Command),
    Export(report::Scope),
}

/// Why a request was refused: an HTTP status and a message for the person.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

impl Refusal {
    pub(super) fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

fn json_body<T: for<'de> Deserialize<'de>>(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<T, Refusal> {
    if !content_type.unwrap_or("").starts_with("application/json") {
        return Err(Refusal::new(
            415,
            "send the request body as JSON (Content-Type: application/json)",
        ));
    }
    if body.len() > MAX_BODY {
        return Err(Refusal::new(
            413,
            format!("request body over {MAX_BODY} bytes"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| Refusal::new(400, format!("malformed request: {e}")))
}

/// Paths the screen serves (another method on one of them is 405, not 404).
const KNOWN: [&str; 14] = [
    "/",
    "/index.html",
    "/app.js",
    "/app.css",
    "/api/state",
    "/api/events",
    "/api/device",
    "/api/history",
    "/api/button",
    "/api/enroll",
    "/api/class",
    "/api/class/update",
    "/api/shot/remove",
    "/api/export",
];

/// Understand a request (method, target, content type, body) without acting on it. Pure, so
/// that it can be fuzzed (`tests/fuzz`, target `ui_request`).
pub fn parse_request(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Route, Refusal> {
    if url.len() > MAX_URL {
        return Err(Refusal::new(414, "request target too long"));
    }
    let path = url.split('?').next().unwrap_or("");
    let cmd = |c: Command| Ok(Route::Command(c));
    match (method, path) {
        ("GET", "/" | "/index.html") => Ok(Route::Index),
        ("GET", "/app.js") => Ok(Route::Script),
        ("GET", "/app.css") => Ok(Route::Style),
        ("GET", "/api/state") => Ok(Route::State),
        ("GET", "/api/events") => Ok(Route::Events),
        ("GET", "/api/device") => Ok(Route::DeviceInfo),
        ("GET", "/api/history") => {
            let q = query(url);
            let get = |k: &str| {
                q.iter()
                    .find(|(kk, v)| kk == k && !v.is_empty())
                    .map(|(_, v)| v.clone())
            };
            Ok(Route::History(report::Filter {
                verdict: get("verdict"),
                class: get("class"),
                day: get("day"),
                captures_only: true,
            }))
        }
        ("GET", p) if p.starts_with("/api/thumb/") => p["/api/thumb/".len()..]
            .strip_suffix(".jpg")
            .and_then(sha_from_hex)
            .map(Route::Thumbnail)
            .ok_or_else(|| Refusal::new(400, "thumbnail names are <64 hex digits>.jpg")),
        ("POST", "/api/button") => {
            let b: ButtonReq = json_body(content_type, body)?;
            let button = Button::parse(&b.button)
                .ok_or_else(|| Refusal::new(400, "button must be \"capture\" or \"next\""))?;
            let press = match b.press.as_deref().unwrap_or("short") {
                "short" => Press::Short,
                "long" => Press::Long,
                _ => return Err(Refusal::new(400, "press must be \"short\" or \"long\"")),
            };
            cmd(Command::Button(ButtonEvent { button, press }))
        }
        ("POST", "/api/enroll") => {
            let b: ClassReq = json_body(content_type, body)?;
            cmd(Command::EnrollClass(b.class))
        }
        ("POST", "/api/class") => {
            let b: AddReq = json_body(content_type, body)?;
            cmd(Command::AddClass {
                name: b.name,
                description: b.description,
                urgent: b.urgent,
            })
        }
        ("POST", "/api/class/update") => {
            let b: UpdateReq = json_body(content_type, body)?;
            cmd(Command::UpdateClass {
                class: b.class,
                name: b.name,
                description: b.description.map(|d| Some(d).filter(|d| !d.is_empty())),
                urgent: b.urgent,
            })
        }
        ("POST", "/api/shot/remove") => {
            let b: ShotReq = json_body(content_type, body)?;
            let sha = sha_from_hex(&b.capture_sha256)
                .ok_or_else(|| Refusal::new(400, "capture_sha256 must be 64 hex digits"))?;
            cmd(Command::RemoveShot {
                class: b.class,
                capture_sha256: sha,
                retake: b.retake,
            })
        }
        ("POST", "/api/export") => {
            let b: ExportReq = json_body(content_type, body)?;
            report::Scope::parse(b.scope.as_deref().unwrap_or("session"))
                .map(Route::Export)
                .map_err(|e| Refusal::new(400, e))
        }
        (_, p) if KNOWN.contains(&p) => Err(Refusal::new(405, "method not allowed")),
        (_, p) => Err(Refusal::new(
            404,
            format!(
                "no such page or request: {}",
                p.chars().take(200).collect::<String>()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::token_matches;
    use super::*;

    #[test]
    fn query_strings_decode() {
        assert_eq!(
            query("/api/history?verdict=refer&class=a%2Fb+c&day="),
            vec![
                ("verdict".into(), "refer".into()),
                ("class".into(), "a/b c".into()),
                ("day".into(), "".into())
            ]
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%é%"), "%é%");
        assert!(token_matches("abc", "abc") && !token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
    }

    #[test]
    fn requests_parse_or_are_refused_with_a_status() {
        let json = Some("application/json");
        assert_eq!(parse_request("GET", "/", None, b""), Ok(Route::Index));
        assert_eq!(
            parse_request(
                "POST",
                "/api/button",
                json,
                br#"{"button":"next","press":"long"}"#
            ),
            Ok(Route::Command(Command::Button(ButtonEvent {
                button: Button::Next,
                press: Press::Long
            })))
        );
        assert_eq!(
            parse_request(
                "POST",
                "/api/class/update",
                json,
                br#"{"class":2,"description":""}"#
            ),
            Ok(Route::Command(Command::UpdateClass {
                class: 2,
                name: None,
                description: Some(None),
                urgent: None
            }))
        );
        let status = |m: &str, u: &str, c: Option<&str>, b: &[u8]| {
            parse_request(m, u, c, b)
                .map(|_| 200)
                .unwrap_or_else(|r| r.status)
        };
        assert_eq!(
            status("POST", "/api/button", None, br#"{"button":"next"}"#),
            415
        );
        assert_eq!(
            status("POST", "/api/button", json, br#"{"button":"next","x":1}"#),
            400
        );
        assert_eq!(status("POST", "/api/enroll", json, b"{"), 400);
        assert_eq!(status("POST", "/api/enroll", json, br#"{"class":-1}"#), 400);
        assert_eq!(status("GET", "/api/button", None, b""), 405);
        assert_eq!(status("DELETE", "/api/state", None, b""), 405);
        assert_eq!(status("GET", "/../../etc/passwd", None, b""), 404);
        assert_eq!(status("GET", "/api/thumb/../../audit.log", None, b""), 400);
        assert_eq!(
            status("GET", &format!("/{}", "a".repeat(3000)), None, b""),
            414
        );
        assert_eq!(
            status("POST", "/api/export", json, br#"{"scope":"everything"}"#),
            400
        );
        assert_eq!(
            status("POST", "/api/export", json, &vec![b' '; MAX_BODY + 1]),
            413
        );
    }
}
