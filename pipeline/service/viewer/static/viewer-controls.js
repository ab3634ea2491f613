// The viewer's own small controls (no other package than Leaflet): a scale bar in micrometres for
// slides, the pointer's coordinates in the mosaic's units, and the swipe divider of a compare view.
// Every text goes in through textContent; styles are set through the CSSOM (element.style), which
// the service's Content-Security-Policy allows, never as HTML or inline attributes.
/* global L */
(function () {
  // 1, 2, 3 or 5 times a power of ten, no larger than `value` (as Leaflet's own scale rounds).
  function roundNumber(value) {
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    const d = value / power;
    return power * (d >= 5 ? 5 : d >= 3 ? 3 : d >= 2 ? 2 : 1);
  }

  // A scale bar for a pixel-space map (L.CRS.Simple) where map point (x, y) at zoom `top` is
  // level-0 pixel (x, y) and a level-0 pixel is `unitsPerPixel` micrometres (or pixels: unit "px").
  const PixelScale = L.Control.extend({
    options: { position: "bottomleft", maxWidth: 120 },

    initialize: function (unitsPerPixel, top, unit, options) {
      L.setOptions(this, options);
      this.unitsPerPixel = unitsPerPixel;
      this.top = top;
      this.unit = unit;
    },

    onAdd: function (map) {
      const container = L.DomUtil.create("div", "leaflet-control-scale tessera-scale");
      this.line = L.DomUtil.create("div", "leaflet-control-scale-line", container);
      map.on("zoomend moveend", this.update, this);
      this.update();
      return container;
    },

    onRemove: function (map) {
      map.off("zoomend moveend", this.update, this);
    },

    update: function () {
      const perScreenPixel = this.unitsPerPixel * Math.pow(2, this.top - this._map.getZoom());
      let length = roundNumber(this.options.maxWidth * perScreenPixel);
      let label = length + " " + this.unit;
      if (this.unit === "µm" && length >= 1000) {
        label = length / 1000 + " mm";
      }
      this.line.style.width = Math.round(length / perScreenPixel) + "px";
      this.line.textContent = label;
    },
  });

  // The mosaic's CRS coordinates of a longitude and latitude, by bilinear interpolation in the grid
  // the service computed with PROJ (`pointer_grid`): lon[j], lat[i] -> x[i][j], y[i][j].
  function gridInterpolate(grid, lon, lat) {
    function cell(axis, v) {
      const n = axis.length;
      let i = 0;
      while (i < n - 2 && v > axis[i + 1]) i++;
      return [i, (v - axis[i]) / (axis[i + 1] - axis[i])];
    }
    const [j, u] = cell(grid.lon, lon);
    const [i, v] = cell(grid.lat, lat);
    function at(values) {
      const bottom = values[i][j] * (1 - u) + values[i][j + 1] * u;
      const upper = values[i + 1][j] * (1 - u) + values[i + 1][j + 1] * u;
      return bottom * (1 - v) + upper * v;
    }
    return { x: at(grid.x), y: at(grid.y) };
  }

  // A vertical divider dragged across the map: `left` panes show left of it, `right` panes right of it.
  function Swipe(map, left, right) {
    const divider = L.DomUtil.create("div", "swipe-divider", map.getContainer());
    L.DomUtil.create("div", "swipe-handle", divider);
    L.DomEvent.disableClickPropagation(divider);
    L.DomEvent.disableScrollPropagation(divider);
    const swipe = { fraction: 0.5, divider: divider };

    swipe.clip = function () {
      const size = map.getSize();
      const nw = map.containerPointToLayerPoint([0, 0]);
      const se = map.containerPointToLayerPoint(size);
      const x = nw.x + size.x * swipe.fraction;
      for (const pane of left) pane.style.clip = "rect(" + [nw.y, x, se.y, nw.x].join("px, ") + "px)";
      for (const pane of right) pane.style.clip = "rect(" + [nw.y, se.x, se.y, x].join("px, ") + "px)";
      divider.style.left = Math.round(size.x * swipe.fraction) + "px";
    };

    swipe.set = function (fraction) {
      swipe.fraction = Math.min(1, Math.max(0, fraction));
      swipe.clip();
    };

    function follow(e) {
      const box = map.getContainer().getBoundingClientRect();
      swipe.set((e.clientX - box.left) / box.width);
    }
    divider.addEventListener("pointerdown", (e) => {
      divider.setPointerCapture(e.pointerId);
      map.dragging.disable();
      divider.addEventListener("pointermove", follow);
    });
    divider.addEventListener("pointerup", (e) => {
      divider.releasePointerCapture(e.pointerId);
      divider.removeEventListener("pointermove", follow);
      map.dragging.enable();
    });
    map.on("move zoom viewreset resize zoomend", swipe.clip);
    swipe.clip();
    return swipe;
  }

  window.tesseraControls = { PixelScale: PixelScale, gridInterpolate: gridInterpolate, Swipe: Swipe };
})();
