//! Validated request types: every field of a command is parsed into a type that cannot hold a bad value.
//!
//! Parsing collects one error per bad field (not just the first) so a client can fix a request in one go.

use std::collections::{HashMap, HashSet};

use events::Decimal;
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

/// The most source images one product may have.
pub const MAX_IMAGES: usize = 10;
/// Longest accepted image URL.
pub const MAX_URL_LEN: usize = 2048;
/// Longest product name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest product description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 5000;
/// Longest user name, in characters.
pub const MAX_USER_NAME_CHARS: usize = 100;

/// One problem with one field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The field, as named in the request (`product_images[2]` for an element).
    pub field: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The top-level fields of a JSON object body, each kept as raw JSON text so that numbers are never
/// rounded through a float before we look at them.
pub type RawFields = HashMap<String, Box<RawValue>>;

/// A price: exact, non-negative, at most two decimal places, below 10^10.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price(Decimal);

impl Price {
    /// Parses the text of a price: a plain decimal such as `19.99`, `5` or `0.5`.
    ///
    /// Rejects exponents (`1e3`), signs, NaN and infinities, more than two significant decimal places
    /// (`1.999`; `1.990` is fine), and values that do not fit NUMERIC(12,2).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.starts_with('-') {
            return Err("must not be negative".into());
        }
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let plain = !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.bytes().all(|b| b.is_ascii_digit())
            && (text.contains('.') != frac.is_empty());
        if !plain {
            return Err("must be a plain decimal number such as 19.99".into());
        }
        if frac.trim_end_matches('0').len() > 2 {
            return Err("must have at most 2 decimal places".into());
        }
        if int.trim_start_matches('0').len() > 10 {
            return Err("must be less than 10000000000".into());
        }
        let frac = &frac[..frac.len().min(2)];
        let value = Decimal::from_str_exact(&format!("{int}.{frac:0<2}"))
            .map_err(|e| format!("is not a valid decimal: {e}"))?;
        Ok(Self(value))
    }

    /// Reads a price given as a JSON number (`19.99`) or a JSON string (`"19.99"`), exactly.
    pub fn from_json(raw: &RawValue) -> Result<Self, String> {
        let text = raw.get();
        if text.starts_with('"') {
            let s: String =
                serde_json::from_str(text).map_err(|_| "must be a string or a number")?;
            Self::parse(&s)
        } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            Self::parse(text)
        } else {
            Err("must be a decimal number or a string holding one".into())
        }
    }

    /// The value, with exactly two decimal places.
    pub fn value(self) -> Decimal {
        self.0
    }
}

fn take<'a>(fields: &'a RawFields, name: &str) -> Option<&'a RawValue> {
    fields
        .get(name)
        .map(|b| &**b)
        .filter(|raw| raw.get() != "null")
}

fn string_field(fields: &RawFields, name: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    let raw = take(fields, name)?;
    match serde_json::from_str::<String>(raw.get()) {
        Ok(s) => Some(s),
        Err(_) => {
            errors.push(FieldError::new(name, "must be a string"));
            None
        }
    }
}

fn text(
    fields: &RawFields,
    name: &str,
    required: bool,
    min_chars: usize,
    max_chars: usize,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    let Some(value) = string_field(fields, name, errors) else {
        if required && take(fields, name).is_none() {
            errors.push(FieldError::new(name, "is required"));
        }
        return None;
    };
    let trimmed = value.trim();
    let chars = trimmed.chars().count();
    // What a reader sees: zero-width characters and whitespace do not count towards "not blank".
    let visible = trimmed
        .chars()
        .filter(|c| !c.is_whitespace() && !is_zero_width(*c))
        .count();
    if trimmed
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r')
    {
        errors.push(FieldError::new(name, "must not contain control characters"));
    } else if trimmed.chars().any(is_bidi_control) {
        errors.push(FieldError::new(
            name,
            "must not contain text-direction override characters",
        ));
    } else if chars < min_chars || (min_chars > 0 && visible == 0) {
        errors.push(FieldError::new(name, "must not be blank"));
    } else if chars > max_chars {
        errors.push(FieldError::new(
            name,
            format!("must be at most {max_chars} characters"),
        ));
    } else {
        return Some(trimmed.to_owned());
    }
    None
}

/// Characters that take no space: text made only of them looks empty.
fn is_zero_width(c: char) -> bool {
    matches!(
        c,
        '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{180E}'
    )
}

/// Embeddings, overrides and isolates that make text display in another order than it is stored
/// (used to disguise names and links).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

fn uuid_field(fields: &RawFields, name: &str, errors: &mut Vec<FieldError>) -> Option<Uuid> {
    let Some(raw) = take(fields, name) else {
        errors.push(FieldError::new(name, "is required"));
        return None;
    };
    match serde_json::from_str::<String>(raw.get())
        .ok()
        .and_then(|s| Uuid::parse_str(&s).ok())
    {
        Some(id) => Some(id),
        None => {
            errors.push(FieldError::new(name, "must be a UUID string"));
            None
        }
    }
}

/// Checks one image URL: absolute http(s) with a host, no credentials, not too long.
pub fn parse_image_url(text: &str) -> Result<String, String> {
    if text.len() > MAX_URL_LEN {
        return Err(format!("must be at most {MAX_URL_LEN} characters"));
    }
    let url = url::Url::parse(text.trim()).map_err(|e| format!("is not a valid URL: {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err("must be an http or https URL".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    Ok(url.to_string())
}

/// A validated `POST /products` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProduct {
    /// The owner, if the body names one (the caller by default; must be a known user, checked by the
    /// handler, not here).
    pub user_id: Option<Uuid>,
    /// Trimmed, 1–200 characters.
    pub product_name: String,
    /// Trimmed, at most 5000 characters; empty when absent.
    pub product_description: String,
    /// Exact price.
    pub product_price: Price,
    /// Normalised http(s) URLs, at most 10, no duplicates; empty when absent.
    pub product_images: Vec<String>,
}

impl NewProduct {
    /// Validates every field, returning all problems at once.
    pub fn parse(fields: &RawFields) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let user_id = match take(fields, "user_id") {
            None => Some(None),
            Some(_) => uuid_field(fields, "user_id", &mut errors).map(Some),
        };
        let product_name = text(fields, "product_name", true, 1, MAX_NAME_CHARS, &mut errors);
        let product_description = if take(fields, "product_description").is_some() {
            text(
                fields,
                "product_description",
                false,
                0,
                MAX_DESCRIPTION_CHARS,
                &mut errors,
            )
        } else {
            Some(String::new())
        };
        let product_price = match take(fields, "product_price") {
            None => {
                errors.push(FieldError::new("product_price", "is required"));
                None
            }
            Some(raw) => Price::from_json(raw)
                .map_err(|m| errors.push(FieldError::new("product_price", m)))
                .ok(),
        };
        let product_images = images(fields, &mut errors);
        match (
            user_id,
            product_name,
            product_description,
            product_price,
            product_images,
        ) {
            (
                Some(user_id),
                Some(product_name),
                Some(product_description),
                Some(product_price),
                Some(product_images),
            ) if errors.is_empty() => Ok(Self {
                user_id,
                product_name,
                product_description,
                product_price,
                product_images,
            }),
            _ => Err(errors),
        }
    }
}

fn images(fields: &RawFields, errors: &mut Vec<FieldError>) -> Option<Vec<String>> {
    let Some(raw) = take(fields, "product_images") else {
        return Some(Vec::new());
    };
    let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(raw.get()) else {
        errors.push(FieldError::new(
            "product_images",
            "must be an array of URL strings",
        ));
        return None;
    };
    if items.len() > MAX_IMAGES {
        errors.push(FieldError::new(
            "product_images",
            format!("must hold at most {MAX_IMAGES} images"),
        ));
        return None;
    }
    let before = errors.len();
    let mut seen = HashSet::new();
    let mut urls = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("product_images[{i}]");
        match serde_json::from_str::<String>(item.get()) {
            Err(_) => errors.push(FieldError::new(field, "must be a string")),
            Ok(s) => match parse_image_url(&s) {
                Err(m) => errors.push(FieldError::new(field, m)),
                Ok(url) if !seen.insert(url.clone()) => {
                    errors.push(FieldError::new(field, "duplicates an earlier image"));
                }
                Ok(url) => urls.push(url),
            },
        }
    }
    (errors.len() == before).then_some(urls)
}

/// A validated `PATCH /products/{id}` body: a JSON merge patch (RFC 7396) of the editable fields. A
/// field that is absent stays as it is; `null` removes what can be removed (description → empty,
/// images → none) and is refused for what cannot (name, price).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProductPatch {
    /// New name.
    pub product_name: Option<String>,
    /// New description.
    pub product_description: Option<String>,
    /// New price.
    pub product_price: Option<Price>,
    /// New image list (normalised, no duplicates).
    pub product_images: Option<Vec<String>>,
}

/// Fields a patch may change.
const PATCHABLE: [&str; 4] = [
    "product_name",
    "product_description",
    "product_price",
    "product_images",
];

impl ProductPatch {
    /// Validates every field with the rules of `POST /products`, returning all problems at once.
    pub fn parse(fields: &RawFields) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut unknown: Vec<&String> = fields
            .keys()
            .filter(|k| !PATCHABLE.contains(&k.as_str()))
            .collect();
        unknown.sort();
        for name in unknown {
            let message = if name == "user_id" {
                "cannot be changed"
            } else {
                "is not a field of a product that can be changed"
            };
            errors.push(FieldError::new(name.as_str(), message));
        }
        let is_null = |name: &str| fields.get(name).is_some_and(|raw| raw.get() == "null");
        let refuse_null = |name: &str, errors: &mut Vec<FieldError>| {
            if is_null(name) {
                errors.push(FieldError::new(name, "cannot be removed"));
            }
        };
        refuse_null("product_name", &mut errors);
        refuse_null("product_price", &mut errors);
        let product_name = text(
            fields,
            "product_name",
            false,
            1,
            MAX_NAME_CHARS,
            &mut errors,
        );
        let product_description = if is_null("product_description") {
            Some(String::new())
        } else {
            text(
                fields,
                "product_description",
                false,
                0,
                MAX_DESCRIPTION_CHARS,
                &mut errors,
            )
        };
        let product_price = take(fields, "product_price").and_then(|raw| {
            Price::from_json(raw)
                .map_err(|m| errors.push(FieldError::new("product_price", m)))
                .ok()
        });
        let product_images = if fields.contains_key("product_images") {
            images(fields, &mut errors)
        } else {
            None
        };
        if errors.is_empty() {
            Ok(Self {
                product_name,
                product_description,
                product_price,
                product_images,
            })
        } else {
            Err(errors)
        }
    }
}

/// A validated `POST /users` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    /// Trimmed, 1–100 characters.
    pub name: String,
    /// Trimmed address with one `@` and a dotted domain.
    pub email: String,
}

impl NewUser {
    /// Validates every field, returning all problems at once.
    pub fn parse(fields: &RawFields) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let name = text(fields, "name", true, 1, MAX_USER_NAME_CHARS, &mut errors);
        let email = text(fields, "email", true, 1, 254, &mut errors).and_then(|e| {
            // One spelling per address: "é" typed as one code point or as e + combining accent is the
            // same address (Unicode NFC), so it registers once.
            use unicode_normalization::UnicodeNormalization;
            let e: String = e.nfc().collect();
            if is_plausible_email(&e) {
                Some(e)
            } else {
                errors.push(FieldError::new(
                    "email",
                    "must be an e-mail address like ada@example.com",
                ));
                None
            }
        });
        match (name, email) {
            (Some(name), Some(email)) if errors.is_empty() => Ok(Self { name, email }),
            _ => Err(errors),
        }
    }
}

/// Deliberately loose: one `@`, non-empty local part, a domain with a dot, no spaces. Delivery is the
/// only real check of an address.
fn is_plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> RawFields {
        serde_json::from_str(json).unwrap()
    }

    fn fields_named(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn prices_are_exact_plain_decimals() {
        assert_eq!(Price::parse("19.99").unwrap().value().to_string(), "19.99");
        assert_eq!(Price::parse("5").unwrap().value().to_string(), "5.00");
        assert_eq!(Price::parse("0.5").unwrap().value().to_string(), "0.50");
        assert_eq!(Price::parse("1.990").unwrap().value().to_string(), "1.99");
        assert_eq!(Price::parse("0").unwrap().value().to_string(), "0.00");
        assert_eq!(
            Price::parse("9999999999.99").unwrap().value().to_string(),
            "9999999999.99"
        );
        for bad in [
            "-1",
            "-0.01",
            "1.999",
            "NaN",
            "inf",
            "1e3",
            "",
            ".5",
            "5.",
            "1,5",
            "0x10",
            "10000000000",
        ] {
            assert!(Price::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn prices_from_json_numbers_are_not_rounded_through_floats() {
        let raw: Box<RawValue> = serde_json::from_str("0.30000000000000004").unwrap();
        assert!(
            Price::from_json(&raw).is_err(),
            "17 decimals must not become 0.3"
        );
        let raw: Box<RawValue> = serde_json::from_str("1234567890.12").unwrap();
        assert_eq!(
            Price::from_json(&raw).unwrap().value().to_string(),
            "1234567890.12"
        );
        let raw: Box<RawValue> = serde_json::from_str("\"12.50\"").unwrap();
        assert_eq!(Price::from_json(&raw).unwrap().value().to_string(), "12.50");
        for bad in ["true", "[1]", "{}", "\"abc\""] {
            let raw: Box<RawValue> = serde_json::from_str(bad).unwrap();
            assert!(Price::from_json(&raw).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_valid_product_parses_with_defaults() {
        let p = NewProduct::parse(&fields(
            r#"{"user_id":"0192f7a3-1b2c-7e4f-8a9b-0c1d2e3f4a5b","product_name":"  Desk ","product_price":349.9}"#,
        ))
        .unwrap();
        assert_eq!(p.product_name, "Desk");
        assert_eq!(p.product_description, "");
        assert!(p.product_images.is_empty());
        assert_eq!(p.product_price.value().to_string(), "349.90");
    }

    #[test]
    fn every_bad_field_is_named() {
        let errors = NewProduct::parse(&fields(
            r#"{"user_id":"nope","product_name":"","product_description":7,
                "product_price":"1.999","product_images":["ftp://x/y.png","https://ok.example/a.jpg","https://ok.example/a.jpg",3]}"#,
        ))
        .unwrap_err();
        assert_eq!(
            fields_named(&errors),
            [
                "user_id",
                "product_name",
                "product_description",
                "product_price",
                "product_images[0]",
                "product_images[2]",
                "product_images[3]"
            ]
        );
    }

    #[test]
    fn missing_required_fields_are_named() {
        // `user_id` is optional: the caller owns what it creates by default.
        let errors = NewProduct::parse(&fields("{}")).unwrap_err();
        assert_eq!(fields_named(&errors), ["product_name", "product_price"]);
        let errors = NewProduct::parse(&fields(
            r#"{"user_id":null,"product_name":null,"product_price":null}"#,
        ))
        .unwrap_err();
        assert_eq!(fields_named(&errors), ["product_name", "product_price"]);
    }

    #[test]
    fn image_lists_are_bounded() {
        let many: Vec<String> = (0..11)
            .map(|i| format!("\"https://x.example/{i}.jpg\""))
            .collect();
        let body = format!(
            r#"{{"user_id":"0192f7a3-1b2c-7e4f-8a9b-0c1d2e3f4a5b","product_name":"n","product_price":1,"product_images":[{}]}}"#,
            many.join(",")
        );
        let errors = NewProduct::parse(&fields(&body)).unwrap_err();
        assert_eq!(fields_named(&errors), ["product_images"]);
        assert!(parse_image_url("https://user:pw@x.example/a.jpg").is_err());
        assert!(parse_image_url("https://").is_err());
        assert!(parse_image_url("/relative/a.jpg").is_err());
        assert!(parse_image_url("javascript:alert(1)").is_err());
        assert!(
            parse_image_url(&format!("https://x.example/{}", "a".repeat(MAX_URL_LEN))).is_err()
        );
    }

    #[test]
    fn names_that_look_empty_or_reorder_themselves_are_refused_and_emails_are_one_spelling() {
        let errors = NewProduct::parse(&fields(
            r#"{"product_name":"\u200b\u200d","product_price":"1","product_description":"a\u202egpj.exe"}"#,
        ))
        .unwrap_err();
        assert_eq!(
            fields_named(&errors),
            ["product_name", "product_description"]
        );
        let composed =
            NewUser::parse(&fields(r#"{"name":"Zoë","email":"zo\u00eb@example.com"}"#)).unwrap();
        let decomposed =
            NewUser::parse(&fields(r#"{"name":"Zoë","email":"zoe\u0308@example.com"}"#)).unwrap();
        assert_eq!(composed.email, decomposed.email);
    }

    #[test]
    fn users_need_a_name_and_a_plausible_email() {
        assert!(NewUser::parse(&fields(r#"{"name":"Ada","email":"ada@example.com"}"#)).is_ok());
        for (body, field) in [
            (r#"{"email":"ada@example.com"}"#, "name"),
            (r#"{"name":"Ada","email":"ada"}"#, "email"),
            (r#"{"name":"Ada","email":"a b@example.com"}"#, "email"),
            (r#"{"name":"Ada","email":"ada@localhost"}"#, "email"),
            (r#"{"name":"   ","email":"ada@example.com"}"#, "name"),
            (r#"{"name":"Ada\u0000","email":"ada@example.com"}"#, "name"),
        ] {
            let errors = NewUser::parse(&fields(body)).unwrap_err();
            assert_eq!(fields_named(&errors), [field], "{body}");
        }
    }
}
