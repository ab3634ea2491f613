// The viewer: a Leaflet map of one mosaic. The class mask is a tile layer over a preview of the
// source image; a click asks the service for the class and confidence at that point.
//
// Georeferenced mosaics use Web Mercator tiles (Leaflet's default CRS). Slides use the pixel
// pyramid in L.CRS.Simple, where map point (x, y) at zoom `top` is level-0 pixel (x, y).
//
// Ids, class names and messages come from mosaics and model bundles: they go in as text (textContent,
// DOM nodes), never as HTML; the service's Content-Security-Policy refuses inline script besides.
/* global L */
(async function () {
  const id = decodeURIComponent(location.pathname.replace(/^\/view\//, ""));
  const api = "/api/mosaics/" + id;
  const response = await fetch(api);
  if (!response.ok) {
    document.getElementById("info").textContent = (await response.json()).detail;
    return;
  }
  const meta = await response.json();
  document.getElementById("name").textContent = id;
  document.title = id + " - tessera";

  const tiles = meta.tiles;
  const top = tiles.max_zoom;
  const geo = tiles.scheme === "xyz";
  const map = geo
    ? L.map("map", { minZoom: tiles.min_zoom, maxZoom: top + 3 })
    : L.map("map", { crs: L.CRS.Simple, minZoom: 0, maxZoom: top + 3 });
  const bounds = geo
    ? L.latLngBounds([tiles.bounds[1], tiles.bounds[0]], [tiles.bounds[3], tiles.bounds[2]])
    : L.latLngBounds(map.unproject([0, tiles.size[0]], top), map.unproject([tiles.size[1], 0], top));
  const options = { bounds: bounds, maxNativeZoom: top, maxZoom: top + 3, noWrap: true, tileSize: 256 };
  const url = (layer) => tiles.url + "?layer=" + layer;

  const source = L.tileLayer(url("source"), options).addTo(map);
  const mask = L.tileLayer(url("mask"), Object.assign({ opacity: 0.6 }, options)).addTo(map);
  map.fitBounds(bounds);

  const slider = document.getElementById("opacity");
  const shown = document.getElementById("opacity-value");
  slider.addEventListener("input", () => {
    mask.setOpacity(slider.value / 100);
    shown.textContent = slider.value + "%";
  });

  const legend = document.getElementById("legend");
  for (const c of meta.classes) {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = "rgb(" + c.color.map(Number).join(",") + ")"; // numbers only, never CSS
    item.append(swatch, c.name);
    legend.append(item);
  }

  const info = document.getElementById("info");
  map.on("click", async (e) => {
    let query;
    if (geo) {
      query = "x=" + e.latlng.lng + "&y=" + e.latlng.lat + "&crs=EPSG:4326";
    } else {
      const p = map.project(e.latlng, top); // level-0 pixels
      const step = meta.mpp || 1; // the mosaic's coordinates are micrometres (or pixels)
      query = "x=" + p.x * step + "&y=" + p.y * step;
    }
    const answer = await fetch(api + "/point?" + query);
    const body = await answer.json();
    if (!answer.ok) {
      info.textContent = body.detail;
      info.dataset.name = "";
      return;
    }
    const confidence = body.confidence === null ? "-" : body.confidence.toFixed(3);
    info.textContent = body.name + "\nconfidence " + confidence + "\nrow " + body.row + ", column " + body.col;
    info.dataset.name = body.name;
    info.dataset.confidence = confidence;
    // A DOM node, not a string: Leaflet puts a string in as HTML, and a class name is whatever the
    // mosaic's model bundle says.
    const popup = document.createElement("span");
    popup.className = "popup-class";
    popup.textContent = body.name + " (" + confidence + ")";
    L.popup().setLatLng(e.latlng).setContent(popup).openOn(map);
  });

  // For tests and scripts: the screen position of a point (lon/lat, or level-0 pixel x/y for slides).
  window.tessera = {
    map: map,
    meta: meta,
    layers: { source: source, mask: mask },
    containerPoint: (x, y) => {
      const latlng = geo ? L.latLng(y, x) : map.unproject([x, y], top);
      const p = map.latLngToContainerPoint(latlng);
      return { x: p.x, y: p.y };
    },
  };
  document.body.dataset.ready = "true";
})();
