// The /docs page: Swagger UI over the service's OpenAPI schema. No validator badge: it would ask
// validator.swagger.io, which an offline cluster cannot reach (and the page's policy refuses).
/* global SwaggerUIBundle */
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
