// The viewer: a Leaflet map of one mosaic. The source image (tiles read from its own pyramid, at full
// resolution when zoomed in) under the class mask, with per-class visibility, the overlays the
// mosaic's metadata lists (confidence, and any other tile layer it names), a scale bar, the pointer's
// coordinates, and a click that asks the service for the class and confidence at that point.
// `/view/A?compare=B` shows mosaic B beside A with a swipe divider (same image, same shape).
//
// Georeferenced mosaics use Web Mercator tiles (Leaflet's default CRS). Slides use the pixel
// pyramid in L.CRS.Simple, where map point (x, y) at zoom `top` is level-0 pixel (x, y).
//
// Ids, class names and messages come from mosaics and model bundles: they go in as text (textContent,
// DOM nodes), never as HTML; the service's Content-Security-Policy refuses inline script besides.
/* global L, tesseraControls */
(async function () {
  const id = decodeURIComponent(location.pathname.replace(/^\/view\//, ""));
  const other = new URLSearchParams(location.search).get("compare");
  const message = document.getElementById("message");
  const say = (text) => {
    message.textContent = text;
    message.hidden = false;
  };

  // A mosaic's API address: each part of its id escaped, the slashes between them kept.
  const apiOf = (mid) => "/api/mosaics/" + mid.split("/").map(encodeURIComponent).join("/");

  async function metadata(mid) {
    const response = await fetch(apiOf(mid));
    const body = await response.json();
    return response.ok ? body : { error: body.detail || "mosaic " + mid + " cannot be read" };
  }

  const meta = await metadata(id);
  if (meta.error) {
    document.getElementById("info").textContent = meta.error;
    return;
  }
  document.getElementById("name").textContent = id;
  document.title = id + " - tessera";

  // The mosaic to compare with: refused unless it is of the same shape and tile scheme.
  let second = null;
  if (other) {
    const candidate = await metadata(other);
    if (candidate.error) {
      say("cannot compare with " + other + ": " + candidate.error);
    } else if (candidate.height !== meta.height || candidate.width !== meta.width ||
               candidate.tiles.scheme !== meta.tiles.scheme) {
      say("cannot compare " + id + " (" + meta.width + " x " + meta.height + " px) with " + other + " (" +
          candidate.width + " x " + candidate.height + " px): a compare shows two mosaics of the same " +
          "image, which have the same shape");
    } else {
      second = candidate;
    }
  }

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

  const source = L.tileLayer(tiles.url + "?layer=source", options).addTo(map);

  // One side per mosaic, each in its own map pane (so a swipe clips it): its mask and its overlays.
  // The overlays are the tile layers the metadata lists besides the mask (confidence at least).
  const overlayNames = (meta.layers || ["mask", "confidence"]).filter((name) => name !== "mask" &&
    (!second || (second.layers || ["mask", "confidence"]).includes(name)));
  const hidden = new Set();
  let maskOpacity = 0.6;
  function makeSide(m, pane) {
    map.createPane(pane);
    const within = Object.assign({ pane: pane }, options);
    const side = {
      meta: m,
      pane: map.getPane(pane),
      maskUrl: () => m.tiles.url + "?layer=mask" + (hidden.size ? "&hide=" + [...hidden].sort().join(",") : ""),
      overlays: {},
    };
    side.mask = L.tileLayer(side.maskUrl(), Object.assign({ opacity: maskOpacity }, within)).addTo(map);
    for (const name of overlayNames) {
      side.overlays[name] = L.tileLayer(m.tiles.url + "?layer=" + encodeURIComponent(name),
        Object.assign({ opacity: 0.8, zIndex: 2 }, within));
    }
    return side;
  }
  const sides = [makeSide(meta, "first")];
  if (second) {
    sides.push(makeSide(second, "second"));
    const swipe = tesseraControls.Swipe(map, [sides[0].pane], [sides[1].pane]);
    sides.swipe = swipe;
    const compareInfo = document.getElementById("compare-info");
    compareInfo.textContent = "left of the divider: " + id + "\nright of it: " + other;
    compareInfo.hidden = false;
  }
  map.fitBounds(bounds);

  const slider = document.getElementById("opacity");
  const shown = document.getElementById("opacity-value");
  slider.addEventListener("input", () => {
    maskOpacity = slider.value / 100;
    for (const side of sides) side.mask.setOpacity(maskOpacity);
    shown.textContent = slider.value + "%";
  });

  // Layer switches: the source image, then each overlay.
  function toggle(list, name, checked, onChange) {
    const item = document.createElement("li");
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = checked;
    box.dataset.layer = name;
    box.addEventListener("change", () => onChange(box.checked));
    label.append(box, " " + name);
    item.append(label);
    list.append(item);
    return item;
  }
  const layerList = document.getElementById("layers");
  toggle(layerList, "source", true, (on) => (on ? source.addTo(map) : source.remove()));
  for (const name of overlayNames) {
    toggle(layerList, name, false, (on) => {
      for (const side of sides) {
        if (on) side.overlays[name].addTo(map);
        else side.overlays[name].remove();
      }
    });
  }

  // The legend: one switch per class; a hidden class is left out of the served mask tiles.
  const legend = document.getElementById("legend");
  for (const c of meta.classes) {
    const item = document.createElement("li");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = true;
    box.dataset.classId = String(Number(c.id));
    box.setAttribute("aria-label", "show " + c.name);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = "rgb(" + c.color.map(Number).join(",") + ")"; // numbers only, never CSS
    const name = document.createElement("span");
    name.textContent = c.name;
    box.addEventListener("change", () => {
      if (box.checked) hidden.delete(Number(c.id));
      else hidden.add(Number(c.id));
      for (const side of sides) side.mask.setUrl(side.maskUrl());
    });
    item.append(box, swatch, name);
    legend.append(item);
  }

  // The scale bar: Leaflet's own in metres for georeferenced mosaics; ours in micrometres for slides.
  if (geo) {
    L.control.scale({ imperial: false, maxWidth: 120 }).addTo(map);
  } else {
    const unit = meta.mpp ? "µm" : "px";
    new tesseraControls.PixelScale(meta.mpp || 1, top, unit).addTo(map);
  }

  // The pointer's coordinates: the mosaic's CRS units (interpolated in the service's grid), or
  // micrometres (pixels) for slides; and the level-0 pixel under it.
  const coords = document.getElementById("coords");
  const unit = geo ? meta.units : meta.mpp ? "µm" : "px";
  const t = meta.transform; // [a, b, c, d, e, f]: pixel (col, row) -> x = a col + b row + c, y = d col + e row + f
  function coordinates(latlng) {
    if (geo) {
      const p = tesseraControls.gridInterpolate(tiles.pointer_grid, latlng.lng, latlng.lat);
      const det = t[0] * t[4] - t[1] * t[3];
      const dx = p.x - t[2];
      const dy = p.y - t[5];
      return { x: p.x, y: p.y, col: (t[4] * dx - t[1] * dy) / det, row: (t[0] * dy - t[3] * dx) / det };
    }
    const p = map.project(latlng, top);
    const step = meta.mpp || 1;
    return { x: p.x * step, y: p.y * step, col: p.x, row: p.y };
  }
  const digits = unit === "deg" ? 6 : 1;
  map.on("mousemove", (e) => {
    const c = coordinates(e.latlng);
    coords.textContent = "x " + c.x.toFixed(digits) + " " + unit + "\ny " + c.y.toFixed(digits) + " " + unit +
      "\nrow " + Math.floor(c.row) + ", column " + Math.floor(c.col);
    coords.dataset.x = String(c.x);
    coords.dataset.y = String(c.y);
    coords.dataset.unit = unit;
  });

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
    const answer = await fetch(apiOf(id) + "/point?" + query);
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

  // For tests and scripts: the layers, and the screen position of a point (lon/lat, or level-0
  // pixel x/y for slides).
  window.tessera = {
    map: map,
    meta: meta,
    layers: { source: source, mask: sides[0].mask, overlays: sides[0].overlays },
    compare: second ? { meta: second, mask: sides[1].mask, overlays: sides[1].overlays, swipe: sides.swipe } : null,
    containerPoint: (x, y) => {
      const latlng = geo ? L.latLng(y, x) : map.unproject([x, y], top);
      const p = map.latLngToContainerPoint(latlng);
      return { x: p.x, y: p.y };
    },
  };
  document.body.dataset.ready = "true";
})();
