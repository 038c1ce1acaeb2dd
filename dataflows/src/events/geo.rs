//! Coordinates and distances on the sphere.

use serde::{Deserialize, Serialize};

use super::Malformed;

/// A WGS 84 position in degrees.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatLng {
    /// Latitude, −90 to 90.
    pub lat: f64,
    /// Longitude, −180 to 180.
    pub lng: f64,
}

impl LatLng {
    /// Checks the ranges; `field` names the coordinate in the reason.
    pub fn check(&self, field: &str) -> Result<(), Malformed> {
        if !(self.lat.is_finite() && (-90.0..=90.0).contains(&self.lat)) {
            return Err(Malformed(format!(
                "{field}.lat {} is not a latitude (-90 to 90)",
                self.lat
            )));
        }
        if !(self.lng.is_finite() && (-180.0..=180.0).contains(&self.lng)) {
            return Err(Malformed(format!(
                "{field}.lng {} is not a longitude (-180 to 180)",
                self.lng
            )));
        }
        Ok(())
    }
}

/// Great-circle distance in km (haversine, mean Earth radius 6371.0088 km).
pub fn haversine_km(a: LatLng, b: LatLng) -> f64 {
    let (p1, p2) = (a.lat.to_radians(), b.lat.to_radians());
    let dp = p2 - p1;
    let dl = (b.lng - a.lng).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0088 * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haversine_matches_a_known_distance() {
        // San Francisco Ferry Building to SFO: 19.41 km (independent Python check).
        let ferry = LatLng {
            lat: 37.7955,
            lng: -122.3937,
        };
        let sfo = LatLng {
            lat: 37.6213,
            lng: -122.3790,
        };
        let d = haversine_km(ferry, sfo);
        assert!((d - 19.4133).abs() < 1e-3, "{d}");
        assert_eq!(haversine_km(ferry, ferry), 0.0);
    }
}
