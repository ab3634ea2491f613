// The index page: one row per mosaic the service finds under its folder. Every value goes in as
// text (textContent), never as HTML: ids and class names are whatever the mosaics say.
(async function () {
  const body = document.querySelector("#mosaics tbody");
  const mosaics = await fetch("/api/mosaics").then((r) => r.json());
  for (const m of mosaics) {
    const row = body.insertRow();
    const link = document.createElement("a");
    link.href = "/view/" + m.id.split("/").map(encodeURIComponent).join("/");
    link.textContent = m.id;
    row.insertCell().append(link);
    row.insertCell().textContent = m.kind;
    row.insertCell().textContent = m.width + " x " + m.height;
    row.insertCell().textContent = m.classes.map((c) => c.name).join(", ");
    row.insertCell().textContent = m.complete ? "yes" : "no (a job is writing it, or was interrupted)";
  }
})();
