// The reader's local time on hover: each <time datetime="…Z"> gets it as its title.
// The page needs no script otherwise; this file is served from the console itself (no CDN).
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("time[datetime]").forEach(function (el) {
    var moment = new Date(el.getAttribute("datetime"));
    if (!isNaN(moment)) {
      el.title = moment.toLocaleString() + " (your local time)";
    }
  });
});
