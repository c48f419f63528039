"""napari viewer and plugin for medcam3d output folders (optional extra: ``pip install medcam3d[napari]``).

HiResCAM next to Grad-CAM on the scan, per abnormality. Importing this package imports neither Qt nor napari;
the modules that need them import them when they are used.

Modules:
    geometry      medcam3d's napari world: (S, P, L) millimetres from RAS affines (numpy only)
    folder        reading an output folder of ``medcam3d explain`` (summary, classes, maps; no Qt)
    layers        napari layer-data tuples for scans and maps: windows, colormaps, blending (no Qt)
    comparison    the side-by-side comparison on a napari viewer, screenshots (no Qt import)
    widget        the comparison dock widget (classes, methods, window, opacity, threshold, peak, 2-D/3-D)
    window        ``open_viewer``: a napari window with the comparison and its dock widget
    app           the former home of comparison + window (re-exports, kept for one release)
    reader        npe2 reader: output folders, their NIfTI maps, scans
    explain_widget  npe2 widget: explain an image layer with a config/model in a worker thread
    sample_data   npe2 sample data: a demo phantom with its explanation
    command       the ``medcam3d view`` sub-command
"""
