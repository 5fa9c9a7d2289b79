//! Payload templates: a device's `payload = { template = '…' }`, compiled once when the
//! configuration is loaded and rendered for every sample.
//!
//! Built on minijinja without its built-in filters (they are most of its size); the filters
//! a payload needs are here: `tojson`, `round`, `default`, `int`, `float`, `upper`,
//! `lower`, and the tests `defined`, `none`, `number`, `string`. Undefined variables are
//! errors, so a misspelt name fails at `fieldmq check`, not on the device. Each rendering
//! has a fuel budget: a template cannot loop for long on a large value.

use std::fmt;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};

/// The one template in each environment.
const NAME: &str = "payload";
/// Instructions one rendering may run (a plain JSON shape takes about a hundred).
const FUEL: u64 = 20_000;
/// The content type of a template without one.
pub const DEFAULT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// What a template is rendered with.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Variables<'a> {
    /// The value: a number, boolean, string, the fields object of a serial frame, or none
    /// for a bad reading.
    pub value: &'a serde_json::Value,
    /// RFC 3339 time of the reading.
    pub ts: &'a str,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// `good` or `bad`.
    pub quality: &'a str,
    /// Why a reading is bad; none when good.
    pub error: Option<&'a str>,
    pub unit: Option<&'a str>,
    pub device: &'a str,
    pub point: &'a str,
    pub gateway: &'a str,
}

/// What a route's template is rendered with: any message on the local broker. A reading in
/// fieldmq's JSON gives `value`, `ts`, `quality`, `unit` and `error` from its fields; any
/// other payload is the `value` itself (parsed when it is JSON), good, timed when the
/// route took it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteVariables {
    /// The local topic.
    pub topic: String,
    /// The payload as text (invalid UTF-8 replaced).
    pub payload: String,
    /// The payload parsed as JSON; none when it is not JSON.
    pub json: serde_json::Value,
    pub value: serde_json::Value,
    pub ts: String,
    pub ts_ms: i64,
    pub quality: String,
    pub error: Option<String>,
    pub unit: Option<String>,
    pub gateway: String,
}

impl RouteVariables {
    /// The variables of a message on `topic`; `unit` is its MQTT 5 `unit` user property,
    /// `now` the time to give a payload without its own.
    pub fn of(
        topic: &str,
        payload: &[u8],
        unit: Option<&str>,
        gateway: &str,
        now: std::time::SystemTime,
    ) -> RouteVariables {
        let text = String::from_utf8_lossy(payload).into_owned();
        let json: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        let field = |name: &str| json.get(name).and_then(serde_json::Value::as_str);
        let reading_ts = field("ts").and_then(|ts| {
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()
        });
        let (ts, ts_ms) = match reading_ts {
            Some(at) => (
                field("ts").unwrap_or_default().to_owned(),
                i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or_default(),
            ),
            None => {
                let at = time::OffsetDateTime::from(now);
                (
                    at.format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or_default(),
                )
            }
        };
        let value = match json.get("value") {
            Some(value) if json.is_object() => value.clone(),
            _ if !json.is_null() => json.clone(),
            _ => serde_json::Value::String(text.clone()),
        };
        RouteVariables {
            topic: topic.to_owned(),
            quality: field("quality").unwrap_or("good").to_owned(),
            error: field("error").map(str::to_owned),
            unit: field("unit").or(unit).map(str::to_owned),
            gateway: gateway.to_owned(),
            payload: text,
            json,
            value,
            ts,
            ts_ms,
        }
    }
}

/// A template that does not parse, or a rendering that fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct TemplateError {
    /// The template's line (1-based), when minijinja knows it.
    pub line: Option<usize>,
    pub message: String,
}

impl From<minijinja::Error> for TemplateError {
    fn from(error: minijinja::Error) -> TemplateError {
        let message = match (error.kind(), error.detail()) {
            (ErrorKind::OutOfFuel, _) => {
                "the template runs too long (a loop over a large value?)".to_owned()
            }
            (kind, Some(detail)) => format!("{kind}: {detail}"),
            (kind, None) => kind.to_string(),
        };
        TemplateError {
            line: error.line(),
            message,
        }
    }
}

/// A compiled payload template with the content type its messages carry.
pub struct PayloadTemplate {
    source: String,
    content_type: String,
    env: Environment<'static>,
}

impl PayloadTemplate {
    /// Compile `source`; `content_type` defaults to [`DEFAULT_CONTENT_TYPE`].
    pub fn compile(source: &str, content_type: Option<&str>) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        env.add_filter("tojson", tojson);
        env.add_filter("round", round);
        env.add_filter("default", default);
        env.add_filter("int", int);
        env.add_filter("float", float);
        env.add_filter("upper", |text: &str| text.to_uppercase());
        env.add_filter("lower", |text: &str| text.to_lowercase());
        env.add_test("defined", |value: &Value| !value.is_undefined());
        env.add_test("none", |value: &Value| value.is_none());
        env.add_test("number", |value: &Value| value.is_number());
        env.add_test("string", |value: &Value| value.as_str().is_some());
        env.add_template_owned(NAME, source.to_owned())?;
        Ok(PayloadTemplate {
            source: source.to_owned(),
            content_type: content_type.unwrap_or(DEFAULT_CONTENT_TYPE).to_owned(),
            env,
        })
    }

    /// Render the payload of one sample.
    pub fn render(&self, variables: &Variables<'_>) -> Result<String, TemplateError> {
        self.render_with(variables)
    }

    /// Render the payload of a message an uplink route reshapes.
    pub fn render_route(&self, variables: &RouteVariables) -> Result<String, TemplateError> {
        self.render_with(variables)
    }

    fn render_with<T: serde::Serialize>(&self, variables: &T) -> Result<String, TemplateError> {
        let template = self.env.get_template(NAME)?;
        Ok(template.render(minijinja::value::Serde(variables))?)
    }

    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for PayloadTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayloadTemplate")
            .field("source", &self.source)
            .field("content_type", &self.content_type)
            .finish()
    }
}

/// Two templates are the same when their text and content type are (a reload keeps a
/// device whose template did not change).
impl PartialEq for PayloadTemplate {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.content_type == other.content_type
    }
}

fn tojson(value: &Value) -> Result<Value, minijinja::Error> {
    let text = serde_json::to_string(value).map_err(|error| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {error}"))
    })?;
    // Marked safe: JSON is the payload, not HTML.
    Ok(Value::from_safe_string(text))
}

fn round(value: f64, precision: Option<i32>) -> Result<Value, minijinja::Error> {
    let digits = precision.unwrap_or(0);
    if !(0..=15).contains(&digits) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "round: precision must be 0 to 15",
        ));
    }
    let factor = 10f64.powi(digits);
    Ok(Value::from((value * factor).round() / factor))
}

fn default(value: &Value, other: Option<Value>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    kwargs.assert_all_used()?;
    Ok(if value.is_undefined() || value.is_none() {
        other.unwrap_or_else(|| Value::from(""))
    } else {
        value.clone()
    })
}

fn int(value: &Value) -> Result<Value, minijinja::Error> {
    if let Some(text) = value.as_str() {
        return text.trim().parse::<i64>().map(Value::from).map_err(|_| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("int: {text:?} is not a number"),
            )
        });
    }
    if value.is_true() && value.kind() == minijinja::value::ValueKind::Bool {
        return Ok(Value::from(1));
    }
    if value.kind() == minijinja::value::ValueKind::Bool {
        return Ok(Value::from(0));
    }
    let number = f64::try_from(value.clone())?;
    if !number.is_finite() || number.abs() >= 9.2e18 {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "int: the value does not fit a 64-bit integer",
        ));
    }
    Ok(Value::from(number.trunc() as i64))
}

fn float(value: &Value) -> Result<Value, minijinja::Error> {
    if let Some(text) = value.as_str() {
        return text.trim().parse::<f64>().map(Value::from).map_err(|_| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("float: {text:?} is not a number"),
            )
        });
    }
    if value.kind() == minijinja::value::ValueKind::Bool {
        return Ok(Value::from(if value.is_true() { 1.0 } else { 0.0 }));
    }
    Ok(Value::from(f64::try_from(value.clone())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn variables<'a>(value: &'a serde_json::Value, unit: Option<&'a str>) -> Variables<'a> {
        Variables {
            value,
            ts: "2026-01-02T03:04:05Z",
            ts_ms: 1_767_323_045_000,
            quality: "good",
            error: None,
            unit,
            device: "boiler",
            point: "temp",
            gateway: "gw1",
        }
    }

    #[test]
    fn renders_every_variable() {
        let template = PayloadTemplate::compile(
            r#"{"v": {{ value }}, "t": {{ ts_ms }}, "ts": "{{ ts }}", "q": "{{ quality }}", "u": "{{ unit }}", "d": "{{ device }}/{{ point }}@{{ gateway }}"}"#,
            Some("application/json"),
        )
        .expect("compiles");
        let value = json!(21.5);
        let out = template
            .render(&variables(&value, Some("°C")))
            .expect("renders");
        let parsed: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(
            parsed,
            json!({"v": 21.5, "t": 1_767_323_045_000i64, "ts": "2026-01-02T03:04:05Z", "q": "good", "u": "°C", "d": "boiler/temp@gw1"})
        );
        assert_eq!(template.content_type(), "application/json");
    }

    #[test]
    fn filters_round_default_tojson_and_case() {
        let template = PayloadTemplate::compile(
            "{{ value|round(1) }} {{ unit|default('-') }} {{ device|upper }} {{ point|lower }} {{ value|int }} {{ '2.5'|float }} {{ {'a': [1, none]}|tojson }}",
            None,
        )
        .expect("compiles");
        let value = json!(21.46);
        assert_eq!(
            template.render(&variables(&value, None)).expect("renders"),
            r#"21.5 - BOILER temp 21 2.5 {"a":[1,null]}"#
        );
        assert_eq!(template.content_type(), DEFAULT_CONTENT_TYPE);
    }

    #[test]
    fn tests_defined_none_number_and_string() {
        let template = PayloadTemplate::compile(
            "{% if value is number %}n{% elif value is none %}x{% elif value is string %}s{% endif %}{% if unit is none %}-{% endif %}{% if nope is defined %}!{% endif %}",
            None,
        )
        .expect("compiles");
        assert_eq!(
            template
                .render(&variables(&json!(1), None))
                .expect("renders"),
            "n-"
        );
        assert_eq!(
            template
                .render(&variables(&json!(null), Some("V")))
                .expect("renders"),
            "x"
        );
        assert_eq!(
            template
                .render(&variables(&json!("on"), None))
                .expect("renders"),
            "s-"
        );
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let error = PayloadTemplate::compile("{\n  \"v\": {{ value }\n}", None).expect_err("fails");
        assert_eq!(error.line, Some(2), "{error}");
        assert!(
            error.to_string().starts_with("line 2: syntax error"),
            "{error}"
        );
    }

    #[test]
    fn an_unknown_variable_or_filter_fails_when_rendered() {
        let value = json!(1);
        let misspelt = PayloadTemplate::compile("{{ valeu }}", None).expect("compiles");
        let error = misspelt
            .render(&variables(&value, None))
            .expect_err("undefined");
        assert!(error.message.contains("undefined"), "{error}");
        let filter = PayloadTemplate::compile("{{ value|sha256 }}", None).expect("compiles");
        let error = filter
            .render(&variables(&value, None))
            .expect_err("unknown filter");
        assert!(error.message.contains("filter"), "{error}");
    }

    #[test]
    fn a_long_loop_runs_out_of_fuel() {
        let template = PayloadTemplate::compile(
            "{% for a in value %}{% for b in value %}{% for c in value %}.{% endfor %}{% endfor %}{% endfor %}",
            None,
        )
        .expect("compiles");
        let big = json!((0..100).collect::<Vec<_>>());
        let error = template
            .render(&variables(&big, None))
            .expect_err("out of fuel");
        assert!(error.message.contains("too long"), "{error}");
    }

    #[test]
    fn a_route_reads_fieldmq_json_and_takes_anything_else_as_the_value() {
        let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(10);
        let reading =
            r#"{"value":21.5,"ts":"2026-01-02T03:04:05.5Z","quality":"good","unit":"°C"}"#
                .as_bytes();
        let v = RouteVariables::of("gw/boiler/temp", reading, None, "gw", at);
        assert_eq!(v.value, json!(21.5));
        assert_eq!(v.ts, "2026-01-02T03:04:05.5Z");
        assert_eq!(v.ts_ms, 1_767_323_045_500);
        assert_eq!(v.unit.as_deref(), Some("°C"));
        let other = RouteVariables::of("x", b"on", Some("V"), "gw", at);
        assert_eq!(other.value, json!("on"));
        assert_eq!(other.json, json!(null));
        assert_eq!(other.ts_ms, 10_000);
        assert_eq!(other.quality, "good");
        assert_eq!(other.unit.as_deref(), Some("V"));
        let list = RouteVariables::of("x", b"[1,2]", None, "gw", at);
        assert_eq!(list.value, json!([1, 2]));
        let template = PayloadTemplate::compile("{{ topic }}={{ value }}@{{ ts_ms }}", None)
            .expect("compiles");
        assert_eq!(
            template.render_route(&v).expect("renders"),
            "gw/boiler/temp=21.5@1767323045500"
        );
    }

    #[test]
    fn non_ascii_text_and_values_pass_through() {
        let template = PayloadTemplate::compile("Temperatur {{ value }} {{ unit }} ✓", None)
            .expect("compiles");
        let value = json!("größer");
        assert_eq!(
            template
                .render(&variables(&value, Some("°C")))
                .expect("renders"),
            "Temperatur größer °C ✓"
        );
    }
}
