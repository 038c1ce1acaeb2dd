//! The events Dima's pipelines carry, their JSON form, and the generators
//! that stand in for production streams.
//!
//! Every event is one JSON object on one line with a `type` field naming its
//! kind and a `schema_version` (this build reads version 1). Times are
//! milliseconds since the Unix epoch (UTC) in `event_time`. `docs/events.md`
//! documents every field with an example line.
//!
//! Parsing never panics: [`parse_line`] returns a [`Malformed`] reason that
//! names the field and, for JSON errors, the column, so a dead-letter record
//! says what was wrong and where.

mod ads;
mod dispatch;
mod geo;

use serde::{Deserialize, Serialize};

pub use ads::{AdsGenerator, AdsTruth, DEFAULT_START_MS, Drift};
pub use dispatch::DispatchGenerator;
pub use geo::{LatLng, haversine_km};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Which pipeline an event belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Sponsored-content events for the incremental learner.
    Ads,
    /// Rider and driver events for dispatch matching.
    Dispatch,
}

impl Family {
    /// Every family.
    pub const ALL: [Self; 2] = [Self::Ads, Self::Dispatch];

    /// One line on what the family is (the CLI's help).
    pub fn describe(self) -> &'static str {
        match self {
            Self::Ads => "Sponsored-content events for the incremental learner",
            Self::Dispatch => "Rider and driver events for dispatch matching",
        }
    }

    /// The name used in manifests, metrics and summaries.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ads => "ads",
            Self::Dispatch => "dispatch",
        }
    }

    /// The event types of this family, in documentation order.
    pub fn types(self) -> &'static [&'static str] {
        match self {
            Self::Ads => &["ad_impression", "ad_click"],
            Self::Dispatch => &[
                "ride_request",
                "driver_status",
                "trip_completed",
                "request_cancelled",
            ],
        }
    }
}

/// A name that is not an event family.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an event family (ads or dispatch)")]
pub struct UnknownFamily(pub String);

impl std::str::FromStr for Family {
    type Err = UnknownFamily;
    fn from_str(name: &str) -> Result<Self, UnknownFamily> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| UnknownFamily(name.to_owned()))
    }
}

/// The context an ad was shown in: the features the learner uses besides
/// the member and the item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdContext {
    /// `mobile`, `desktop` or `tablet`.
    pub device: String,
    /// Where on the page: `feed`, `right_rail` or `search`.
    pub placement: String,
    /// 1-based slot within the placement.
    pub position: u32,
    /// ISO 3166 alpha-2 country of the member.
    pub country: String,
    /// Hour of day (0–23, UTC) of the event.
    pub hour: u32,
}

/// A sponsored item was shown to a member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdImpression {
    /// Schema version (1).
    pub schema_version: u32,
    /// Milliseconds since the Unix epoch.
    pub event_time: i64,
    /// Unique id of this impression; a click names it.
    pub impression_id: u64,
    /// The member who saw it.
    pub member_id: u64,
    /// The sponsored item.
    pub item_id: u64,
    /// The campaign the item belongs to.
    pub campaign_id: u64,
    /// Context features.
    pub context: AdContext,
}

/// A member clicked an impression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdClick {
    /// Schema version (1).
    pub schema_version: u32,
    /// Milliseconds since the Unix epoch.
    pub event_time: i64,
    /// The impression clicked.
    pub impression_id: u64,
    /// The member who clicked.
    pub member_id: u64,
    /// The sponsored item.
    pub item_id: u64,
    /// The campaign the item belongs to.
    pub campaign_id: u64,
}

/// A rider asked for a ride.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RideRequest {
    /// Schema version (1).
    pub schema_version: u32,
    /// Milliseconds since the Unix epoch.
    pub event_time: i64,
    /// Unique id of the request.
    pub request_id: u64,
    /// The rider.
    pub rider_id: u64,
    /// Where to pick the rider up.
    pub pickup: LatLng,
    /// Where the rider goes.
    pub dropoff: LatLng,
}

/// Where a driver is and what they are doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverState {
    /// Online and free to take a request.
    Idle,
    /// Driving to a pickup.
    EnRoute,
    /// Carrying a rider.
    OnTrip,
    /// Not working.
    Offline,
}

/// A driver's periodic status ping.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverStatus {
    /// Schema version (1).
    pub schema_version: u32,
    /// Milliseconds since the Unix epoch.
    pub event_time: i64,
    /// The driver.
    pub driver_id: u64,
    /// Current position.
    pub location: LatLng,
    /// Current state.
    pub state: DriverState,
}

/// A trip ended at its drop-off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TripCompleted {
    /// Schema version (1).
    pub schema_version: u32,
    /// Milliseconds since the Unix epoch (drop-off time).
    pub event_time: i64,
    /// The request the trip served.
    pub request_id: u64,
    /// The driver.
    pub driver_id: u64,
    /// Fare charged, in US dollars.
    pub fare: f64,
    /// Distance driven with the rider, km.
    pub distance_km: f64,
    /// Time with the rider, seconds.
    pub duration_s: u32,
}

/// A request ended without a trip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestCancelled {
    /// Schema version (1).
    pub schema_version: u32,
    /// Milliseconds since the Unix epoch.
    pub event_time: i64,
    /// The request.
    pub request_id: u64,
    /// The rider.
    pub rider_id: u64,
    /// `rider` (gave up waiting) or `no_driver` (nobody could be matched).
    pub reason: String,
}

/// Any event, tagged by its `type` field.
///
/// Reading is hand-written ([`Deserialize`] below) so that the common case,
/// `type` as the first field, streams straight into the event's struct;
/// serde's derived internally tagged enums buffer every field first, which
/// made parsing the pipelines' bottleneck.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// `ad_impression`.
    AdImpression(AdImpression),
    /// `ad_click`.
    AdClick(AdClick),
    /// `ride_request`.
    RideRequest(RideRequest),
    /// `driver_status`.
    DriverStatus(DriverStatus),
    /// `trip_completed`.
    TripCompleted(TripCompleted),
    /// `request_cancelled`.
    RequestCancelled(RequestCancelled),
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EventVisitor)
    }
}

struct EventVisitor;

/// Deserializes the event of type `kind` from `rest` (the other fields).
fn event_of<'de, D: serde::Deserializer<'de>>(kind: &str, rest: D) -> Result<Event, D::Error> {
    Ok(match kind {
        "ad_impression" => Event::AdImpression(AdImpression::deserialize(rest)?),
        "ad_click" => Event::AdClick(AdClick::deserialize(rest)?),
        "ride_request" => Event::RideRequest(RideRequest::deserialize(rest)?),
        "driver_status" => Event::DriverStatus(DriverStatus::deserialize(rest)?),
        "trip_completed" => Event::TripCompleted(TripCompleted::deserialize(rest)?),
        "request_cancelled" => Event::RequestCancelled(RequestCancelled::deserialize(rest)?),
        other => return Err(serde::de::Error::unknown_variant(other, &TYPES)),
    })
}

impl<'de> serde::de::Visitor<'de> for EventVisitor {
    type Value = Event;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an event object with a \"type\" field")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Event, A::Error> {
        let Some(first) = map.next_key::<std::borrow::Cow<'de, str>>()? else {
            return Err(serde::de::Error::missing_field("type"));
        };
        if first == "type" {
            let kind = map.next_value::<std::borrow::Cow<'de, str>>()?;
            return event_of(&kind, serde::de::value::MapAccessDeserializer::new(map));
        }
        // `type` is not first: collect the fields, then dispatch.
        let mut object = serde_json::Map::new();
        object.insert(first.into_owned(), map.next_value()?);
        while let Some((key, value)) = map.next_entry::<String, serde_json::Value>()? {
            object.insert(key, value);
        }
        let kind = match object.remove("type") {
            Some(serde_json::Value::String(kind)) => kind,
            Some(other) => {
                return Err(serde::de::Error::custom(format!(
                    "type: {other} is not a string"
                )));
            }
            None => return Err(serde::de::Error::missing_field("type")),
        };
        event_of(&kind, serde_json::Value::Object(object)).map_err(serde::de::Error::custom)
    }
}

/// The same events with serde's default (external) enum tagging, for
/// timely's exchange channels: their binary encoding cannot read internally
/// tagged enums (that needs a self-describing format such as JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireEvent {
    /// `ad_impression`.
    AdImpression(AdImpression),
    /// `ad_click`.
    AdClick(AdClick),
    /// `ride_request`.
    RideRequest(RideRequest),
    /// `driver_status`.
    DriverStatus(DriverStatus),
    /// `trip_completed`.
    TripCompleted(TripCompleted),
    /// `request_cancelled`.
    RequestCancelled(RequestCancelled),
}

impl WireEvent {
    /// Index of the type in [`TYPES`].
    pub fn type_index(&self) -> usize {
        match self {
            Self::AdImpression(_) => 0,
            Self::AdClick(_) => 1,
            Self::RideRequest(_) => 2,
            Self::DriverStatus(_) => 3,
            Self::TripCompleted(_) => 4,
            Self::RequestCancelled(_) => 5,
        }
    }
}

impl From<Event> for WireEvent {
    fn from(e: Event) -> Self {
        match e {
            Event::AdImpression(e) => Self::AdImpression(e),
            Event::AdClick(e) => Self::AdClick(e),
            Event::RideRequest(e) => Self::RideRequest(e),
            Event::DriverStatus(e) => Self::DriverStatus(e),
            Event::TripCompleted(e) => Self::TripCompleted(e),
            Event::RequestCancelled(e) => Self::RequestCancelled(e),
        }
    }
}

impl From<WireEvent> for Event {
    fn from(e: WireEvent) -> Self {
        match e {
            WireEvent::AdImpression(e) => Self::AdImpression(e),
            WireEvent::AdClick(e) => Self::AdClick(e),
            WireEvent::RideRequest(e) => Self::RideRequest(e),
            WireEvent::DriverStatus(e) => Self::DriverStatus(e),
            WireEvent::TripCompleted(e) => Self::TripCompleted(e),
            WireEvent::RequestCancelled(e) => Self::RequestCancelled(e),
        }
    }
}

/// All event type names, in documentation order (ads first).
pub const TYPES: [&str; 6] = [
    "ad_impression",
    "ad_click",
    "ride_request",
    "driver_status",
    "trip_completed",
    "request_cancelled",
];

/// Why a line is not a valid event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

impl Event {
    /// The `type` field.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::AdImpression(_) => "ad_impression",
            Self::AdClick(_) => "ad_click",
            Self::RideRequest(_) => "ride_request",
            Self::DriverStatus(_) => "driver_status",
            Self::TripCompleted(_) => "trip_completed",
            Self::RequestCancelled(_) => "request_cancelled",
        }
    }

    /// Index of the type in [`TYPES`].
    pub fn type_index(&self) -> usize {
        match self {
            Self::AdImpression(_) => 0,
            Self::AdClick(_) => 1,
            Self::RideRequest(_) => 2,
            Self::DriverStatus(_) => 3,
            Self::TripCompleted(_) => 4,
            Self::RequestCancelled(_) => 5,
        }
    }

    /// The pipeline this event belongs to.
    pub fn family(&self) -> Family {
        match self {
            Self::AdImpression(_) | Self::AdClick(_) => Family::Ads,
            _ => Family::Dispatch,
        }
    }

    /// Event time, ms since the Unix epoch.
    pub fn event_time(&self) -> i64 {
        match self {
            Self::AdImpression(e) => e.event_time,
            Self::AdClick(e) => e.event_time,
            Self::RideRequest(e) => e.event_time,
            Self::DriverStatus(e) => e.event_time,
            Self::TripCompleted(e) => e.event_time,
            Self::RequestCancelled(e) => e.event_time,
        }
    }

    /// The entity whose state this event updates, for keyed exchange: the
    /// member for ads, the request or driver for dispatch.
    pub fn key(&self) -> u64 {
        match self {
            Self::AdImpression(e) => e.member_id,
            Self::AdClick(e) => e.member_id,
            Self::RideRequest(e) => e.request_id,
            Self::DriverStatus(e) => e.driver_id,
            Self::TripCompleted(e) => e.request_id,
            Self::RequestCancelled(e) => e.request_id,
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            Self::AdImpression(e) => e.schema_version,
            Self::AdClick(e) => e.schema_version,
            Self::RideRequest(e) => e.schema_version,
            Self::DriverStatus(e) => e.schema_version,
            Self::TripCompleted(e) => e.schema_version,
            Self::RequestCancelled(e) => e.schema_version,
        }
    }

    /// Checks what JSON types cannot: the version, ranges, consistency.
    pub fn validate(&self) -> Result<(), Malformed> {
        let bad = |m: String| Err(Malformed(m));
        if self.schema_version() != SCHEMA_VERSION {
            return bad(format!(
                "schema_version {} is not supported (this build reads {SCHEMA_VERSION})",
                self.schema_version()
            ));
        }
        if self.event_time() < 0 {
            return bad(format!("event_time {} is before 1970", self.event_time()));
        }
        match self {
            Self::AdImpression(e) => {
                let c = &e.context;
                if !matches!(c.device.as_str(), "mobile" | "desktop" | "tablet") {
                    return bad(format!(
                        "context.device {:?} is not mobile, desktop or tablet",
                        c.device
                    ));
                }
                if !matches!(c.placement.as_str(), "feed" | "right_rail" | "search") {
                    return bad(format!(
                        "context.placement {:?} is not feed, right_rail or search",
                        c.placement
                    ));
                }
                if c.position == 0 {
                    return bad("context.position must be at least 1".into());
                }
                if c.hour > 23 {
                    return bad(format!("context.hour {} is not 0-23", c.hour));
                }
                if c.country.len() != 2 || !c.country.bytes().all(|b| b.is_ascii_uppercase()) {
                    return bad(format!(
                        "context.country {:?} is not an ISO 3166 alpha-2 code",
                        c.country
                    ));
                }
            }
            Self::RideRequest(e) => {
                e.pickup.check("pickup")?;
                e.dropoff.check("dropoff")?;
            }
            Self::DriverStatus(e) => e.location.check("location")?,
            Self::TripCompleted(e) => {
                for (field, value) in [("fare", e.fare), ("distance_km", e.distance_km)] {
                    if !(value.is_finite() && value >= 0.0) {
                        return bad(format!("{field} {value} is not a non-negative number"));
                    }
                }
            }
            Self::RequestCancelled(e) => {
                if !matches!(e.reason.as_str(), "rider" | "no_driver") {
                    return bad(format!("reason {:?} is not rider or no_driver", e.reason));
                }
            }
            Self::AdClick(_) => {}
        }
        Ok(())
    }

    /// The event as one JSON line (no newline).
    pub fn to_line(&self) -> String {
        // Serializing these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Parses and validates one line. Leading and trailing whitespace (a `\r`
/// before the newline, say) is ignored.
pub fn parse_line(line: &str) -> Result<Event, Malformed> {
    let text = line.trim();
    if text.is_empty() {
        return Err(Malformed("empty line".into()));
    }
    let event: Event = serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        // serde_json ends with "at line 1 column N": keep the column, the
        // line is the record's own position.
        let reason = match message.rsplit_once(" at line 1 column ") {
            Some((what, column)) => format!("{what} (column {column})"),
            None => message,
        };
        Malformed(reason)
    })?;
    event.validate()?;
    Ok(event)
}

/// Parses `bytes` as one event line, reporting invalid UTF-8 by byte offset.
pub fn parse_bytes(bytes: &[u8]) -> Result<Event, Malformed> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_line(text),
        Err(e) => Err(Malformed(format!(
            "invalid UTF-8 at byte {} of the line",
            e.valid_up_to()
        ))),
    }
}

/// Turns a valid event line into a malformed one, in one of several ways a
/// real producer goes wrong. Generators use it to make dead-letter traffic.
pub fn corrupt(line: &str, how: u64) -> String {
    match how % 5 {
        0 => line[..line.len() / 2].to_owned(),
        1 => line.replacen("\"schema_version\":1", "\"schema_version\":9", 1),
        2 => line.replacen("\"type\":\"", "\"type\":\"x_", 1),
        3 => line.replacen("\"event_time\":", "\"event_time\":\"soon\",\"was\":", 1),
        _ => format!("{line} trailing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn impression() -> Event {
        Event::AdImpression(AdImpression {
            schema_version: 1,
            event_time: 1_795_651_200_000,
            impression_id: 9,
            member_id: 7,
            item_id: 3,
            campaign_id: 1,
            context: AdContext {
                device: "mobile".into(),
                placement: "feed".into(),
                position: 2,
                country: "US".into(),
                hour: 0,
            },
        })
    }

    #[test]
    fn lines_round_trip_with_the_type_tag_first() {
        let line = impression().to_line();
        assert!(
            line.starts_with(r#"{"type":"ad_impression","schema_version":1,"#),
            "{line}"
        );
        assert_eq!(parse_line(&line).unwrap(), impression());
        assert_eq!(parse_line(&format!("  {line}\r")).unwrap(), impression());
    }

    #[test]
    fn malformed_lines_say_what_and_where() {
        let line = impression().to_line();
        let reason = |text: &str| parse_line(text).unwrap_err().0;
        assert_eq!(reason(""), "empty line");
        assert!(
            reason(&line[..40]).contains("EOF while parsing"),
            "{}",
            reason(&line[..40])
        );
        assert!(reason(&line[..40]).contains("(column 40)"));
        assert!(
            reason(&line.replace("ad_impression", "ad_view")).contains("unknown variant `ad_view`")
        );
        assert_eq!(
            reason(&line.replace("\"schema_version\":1", "\"schema_version\":2")),
            "schema_version 2 is not supported (this build reads 1)"
        );
        assert!(
            reason(&line.replace("\"member_id\":7,", "")).contains("missing field `member_id`")
        );
        assert!(reason(&line.replace("\"mobile\"", "\"phone\"")).contains("context.device"));
        assert!(reason(&line.replace("\"US\"", "\"usa\"")).contains("context.country"));
        assert!(
            reason(&line.replace("\"hour\":0", "\"hour\":0,\"extra\":1"))
                .contains("unknown field `extra`")
        );
        assert!(
            parse_bytes(b"{\"type\":\xff}")
                .unwrap_err()
                .0
                .contains("invalid UTF-8 at byte 8")
        );
        for how in 0..5 {
            assert!(
                parse_line(&corrupt(&line, how)).is_err(),
                "corruption {how}"
            );
        }
    }

    #[test]
    fn type_may_come_anywhere_in_the_object() {
        let line = r#"{"schema_version":1,"event_time":5,"impression_id":9,"member_id":7,"item_id":3,"campaign_id":1,"type":"ad_click"}"#;
        assert_eq!(parse_line(line).unwrap().type_name(), "ad_click");
        let reason = |t: &str| parse_line(t).unwrap_err().0;
        assert!(
            reason(&line.replace(",\"type\":\"ad_click\"", "")).contains("missing field `type`")
        );
        assert!(reason(&line.replace("\"ad_click\"", "7")).contains("type: 7 is not a string"));
        assert!(
            reason(&line.replace("\"member_id\":7,", "")).contains("missing field `member_id`")
        );
        assert!(
            reason("[1,2]").contains("expected an event object"),
            "{}",
            reason("[1,2]")
        );
        assert!(
            reason(r#"{"type":"ad_click","type":"ad_click"}"#).contains("unknown field `type`")
        );
    }

    #[test]
    fn dispatch_events_check_coordinates_and_reasons() {
        let status = r#"{"type":"driver_status","schema_version":1,"event_time":5,"driver_id":1,"location":{"lat":37.7,"lng":-122.4},"state":"idle"}"#;
        assert_eq!(parse_line(status).unwrap().family(), Family::Dispatch);
        let bad = status.replace("37.7", "97.7");
        assert!(
            parse_line(&bad)
                .unwrap_err()
                .0
                .contains("location.lat 97.7"),
            "{:?}",
            parse_line(&bad)
        );
        let bad = status.replace("idle", "napping");
        assert!(
            parse_line(&bad)
                .unwrap_err()
                .0
                .contains("unknown variant `napping`")
        );
        let cancel = r#"{"type":"request_cancelled","schema_version":1,"event_time":5,"request_id":1,"rider_id":2,"reason":"bored"}"#;
        assert!(
            parse_line(cancel)
                .unwrap_err()
                .0
                .contains("reason \"bored\"")
        );
    }
}
